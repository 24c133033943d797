"""compiler.quantsim: the simulation a pass measures through is the model the pipeline writes."""
import numpy as np
import onnx.parser

from compiler import quantsim
from compiler.ir import from_onnx, infer_shapes
from compiler.pass_manager import PassContext, PassManager, parse_pipeline
from compiler.runtime import sample_inputs

MODEL = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[1,3,8,8] x) => (float[1,4,8,8] y) <float[4,3,3,3] w1 = %s, float[4] b1 = {0.5,-0.5,0.25,0.1},
                                             float[4,4,1,1] w2 = %s, float[4] b2 = {0.1,0.2,-0.3,0.05}> {
  c1 = Conv<pads=[1,1,1,1]>(x, w1, b1)
  r1 = Relu(c1)
  c2 = Conv(r1, w2, b2)
  y = Relu(c2)
}
"""


def model():
    rng = np.random.default_rng(0)
    values = lambda n: "{" + ",".join(f"{v:.4f}" for v in rng.normal(size=n)) + "}"
    return from_onnx(infer_shapes(onnx.parser.parse_model(MODEL % (values(108), values(16)))))


def test_bias_correction_simulates_the_pipelines_own_propagation_and_config(monkeypatch):
    """The sequential bias correction's simulation must be the QDQ model the pipeline ends with: with
    propagate-encodings{fuse-activations=false} and quant{weight-bits=4} in the pipeline, the simulated
    activation encodings are the written ones and its weights 4-bit (a simulation built with propagate-encodings'
    defaults fused c1 with r1, which the written model does not)."""
    simulations = []
    original = quantsim.QuantSim.of_pipeline.__func__

    def recording(cls, module, ctx):
        simulations.append(original(cls, module, ctx))
        return simulations[-1]
    monkeypatch.setattr(quantsim.QuantSim, "of_pipeline", classmethod(recording))
    module = model()
    ctx = PassContext(calib_data=sample_inputs(module, PassContext(seed=1), 4), log=lambda m: None)
    text = ("quant{weight-bits=4},calibrate{method=minmax},bias-correction{mode=sequential output-layers=true},"
            "propagate-encodings{fuse-activations=false},insert-qdq")
    PassManager(parse_pipeline(text), quiet=True).run(module, ctx)
    (sim,) = simulations
    for name in ("x", "c1", "r1", "c2", "y"):
        assert sim.propagated.encodings[name] == module.encodings[name], name
    assert sim.propagated.encodings["c1"] != sim.propagated.encodings["r1"]  # not fused, as written
    stored = [t.values for n in sim.qdq.graph.nodes if n.op == "DequantizeLinear" and n.inputs[0].name.startswith("w")
              for t in n.inputs[:1]]
    assert stored and all(v.min() >= -8 and v.max() <= 7 for v in stored)
