"""compiler.quantsim: the simulation a pass measures through is the model the pipeline writes."""
import numpy as np
import onnx.parser
import pytest

from compiler import quantsim
from compiler.ir import from_onnx, infer_shapes
from compiler.pass_manager import PassContext, PassManager, parse_pipeline
from compiler.runtime import make_session, sample_inputs

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


@pytest.mark.parametrize("dtype, domain, opset", [
    (np.int8, "", 13), (np.uint8, "", 13), (np.int32, "", 13),
    (np.int16, "com.microsoft", 13), (np.uint16, "com.microsoft", 13), (np.int16, "", 21), (np.uint16, "", 21)])
@pytest.mark.parametrize("per_axis", [False, True])
def test_constants_dequantized_once_are_what_dequantizelinear_computes_bit_for_bit(dtype, domain, opset, per_axis):
    """MixedPrecisionSim dequantizes its switched constants itself (quantsim.dequantized): the values must be
    onnxruntime's, bit for bit, or the simulation is not the model insert-qdq writes."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    info = np.iinfo(dtype)
    stored = rng.integers(info.min, info.max, size=(16, 8, 3, 3), endpoint=True).astype(dtype)
    channels = 8 if per_axis else 1
    scale = (rng.random(channels) * 1e-2 + 1e-6).astype(np.float32)
    zero = (rng.integers(0, info.max // 4, size=channels) if info.min == 0 else np.zeros(channels)).astype(dtype)
    if not per_axis:
        scale, zero = scale[0], zero[0]
    initializers = [numpy_helper.from_array(np.asarray(v), n) for v, n in ((stored, "x"), (scale, "s"), (zero, "z"))]
    node = helper.make_node("DequantizeLinear", ["x", "s", "z"], ["y"], domain=domain, axis=1)
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(helper.make_graph([node], "dq", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                                                initializers), opset_imports=opsets)
    expected = make_session(model).run(None, {})[0]
    got = quantsim.dequantized([stored, scale, zero], axis=1)
    assert got.dtype == np.float32 and np.array_equal(got.view(np.int32), expected.view(np.int32))
