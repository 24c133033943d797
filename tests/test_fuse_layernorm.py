"""fuse-layernorm: the remarks on mean subtractions it does not fuse, the opset rule, the rewrite on PP-OCR rec
(float outputs unchanged), and LayerNormalization's quantization as HTP takes it (the rewrites themselves are
golden cases)."""
import numpy as np
import onnx.parser
import pytest

from compiler.config import QuantConfig
from compiler.encoding import stored_values
from compiler.ir import const_value, from_onnx, infer_shapes
from compiler.pass_manager import Pipeline, PassContext, PassManager, parse_pipeline
from tests.real_models import load_canonical, op_count, run_verified

CONSTS = ("<float two = {2.0}, float three = {3.0}, float eps = {0.00001}, float[4] gamma = {1.0, 2.0, 0.5, 1.5}, "
          "float[3,1] column = {1.0, 2.0, 3.0}>")
LAYERNORM = ("m = ReduceMean <axes = [-1]> (x)\n d = Sub(x, m)\n p = Pow(d, two)\n v = ReduceMean <axes = [-1]> (p)\n"
             " a = Add(v, eps)\n s = Sqrt(a)\n")


def fuse(body: str, outputs: str = "float[1,3,4] y", opset: int = 17):
    text = f'<ir_version: 8, opset_import: ["" : {opset}]>\ng (float[1,3,4] x) => ({outputs}) {CONSTS} {{{body}}}'
    module = from_onnx(infer_shapes(onnx.parser.parse_model(text)))
    ctx = PassContext(log=lambda message: None)
    manager = PassManager(parse_pipeline("fuse-layernorm"), verify=True, quiet=True)
    manager.run(module, ctx)
    return module, manager.records[-1], [r.message for r in ctx.remarks]


@pytest.mark.parametrize("body, outputs, reason", [
    (LAYERNORM + " y = Div(d, s)", "float[1,3,4] y, float[1,3,4] d", "x - mean %d is a graph output"),
    (LAYERNORM + " n = Div(d, s)\n y = Add(n, d)", "float[1,3,4] y", "x - mean %d feeds other nodes"),
    (LAYERNORM.replace("Pow(d, two)", "Pow(d, three)") + " y = Div(d, s)", "float[1,3,4] y", "is not squared"),
    (LAYERNORM.replace("v = ReduceMean <axes = [-1]> (p)", "v = ReduceMean <axes = [-2]> (p)") + " y = Div(d, s)",
     "float[1,3,4] y", "reduces axes [-2], not the last ones"),
    ("m = ReduceMean <axes = [1]> (x)\n y = Sub(x, m)", "float[1,3,4] y", "reduces axes [1], not the last ones"),
    (LAYERNORM.replace("a = Add(v, eps)\n s = Sqrt(a)", "q = Sqrt(v)\n s = Add(q, eps)") + " y = Div(d, s)",
     "float[1,3,4] y", "the variance feeds a Sqrt, not an Add"),
    (LAYERNORM + " y = Div(s, d)", "float[1,3,4] y", "does not divide x - mean by it"),
])
def test_declined_mean_subtraction_gets_a_remark(body, outputs, reason):
    _, record, remarks = fuse(body, outputs)
    assert not record.modified and len(remarks) == 1 and reason in remarks[0], remarks


def test_gamma_varying_along_other_axes_stays_a_mul():
    module, record, remarks = fuse(LAYERNORM + " n = Div(d, s)\n y = Mul(n, column)")
    assert record.stats == {"layernorm-fused": 1} and not remarks
    ops = [n.op for n in module.graph.nodes]
    assert ops == ["LayerNormalization", "Mul"]
    assert np.array_equal(const_value(module.graph.nodes[0].inputs[1]), np.ones(4, np.float32))


def test_below_opset_17_one_remark_and_nothing_changed():
    module, record, remarks = fuse(LAYERNORM + " y = Div(d, s)", opset=14)
    assert not record.modified and len(remarks) == 1
    assert "needs opset 17, the model has 14" in remarks[0] and "upgrade-opset{version=17}" in remarks[0]
    assert "LayerNormalization" not in [n.op for n in module.graph.nodes]


def test_affine_taken_in_and_output_name_kept():
    module, record, remarks = fuse(LAYERNORM + " n = Div(d, s)\n g = Mul(gamma, n)\n y = Add(g, eps)")
    (node,) = module.graph.nodes
    assert node.op == "LayerNormalization" and node.outputs[0].name == "y" and node.attrs["axis"] == -1
    assert np.allclose(const_value(node.inputs[2]), np.full(4, 1e-5)) and node.attrs["epsilon"] == pytest.approx(1e-5)


def test_rec_layernorms_fused_with_outputs_unchanged(assets):
    module, ctx = load_canonical(assets, "rec")
    manager = run_verified(module, ctx, "fuse-layernorm")  # onnxruntime on text lines before and after
    assert manager.records[-1].stats == {"layernorm-fused": 5} and op_count(module, "LayerNormalization") == 5
    assert op_count(module, "Sqrt") == op_count(module, "Pow") == op_count(module, "ReduceMean") == 0


@pytest.mark.parametrize("act_bits", [8, 16])
def test_layernorm_quantized_with_unsigned_scale_and_int32_bias(act_bits):
    text = ('<ir_version: 8, opset_import: ["" : 17]>\ng (float[1,3,4] x) => (float[1,3,4] y) '
            '<float[4] gamma = {1.0, 2.0, -0.5, 1.5}, float[4] beta = {0.1, -0.2, 0.3, 0.4}> '
            '{ y = LayerNormalization <axis = -1> (x, gamma, beta) }')
    module = from_onnx(infer_shapes(onnx.parser.parse_model(text)))
    pipeline = Pipeline(parse_pipeline("calibrate{method=minmax},propagate-encodings,insert-qdq"), QuantConfig(act_bits=act_bits))
    samples = [{"x": np.random.default_rng(i).normal(0, 2, (1, 3, 4)).astype(np.float32)} for i in range(4)]
    PassManager(pipeline, quiet=True).run(module, PassContext(calib_data=samples, log=lambda message: None))
    gamma, beta, x = module.encodings["gamma"], module.encodings["beta"], module.encodings["x"]
    assert (gamma.bw, gamma.symmetric, gamma.axis) == (8, False, None) and gamma.min[0] == pytest.approx(-0.5, abs=0.01)
    assert beta.bw == 32 and beta.symmetric
    assert beta.scale[0] == pytest.approx(np.float32(x.scale[0]) * np.float32(gamma.scale[0]), rel=1e-6)
    stored = {t.name: const_value(t) for t in module.graph.tensors().values() if const_value(t) is not None}
    assert stored["gamma_quantized"].dtype == np.uint8 and stored["beta_quantized"].dtype == np.int32
    assert np.array_equal(stored["gamma_quantized"], stored_values(np.array([1.0, 2.0, -0.5, 1.5]), gamma))
