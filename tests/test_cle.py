"""Cross-layer equalization: hand-computed scales, chains, bias absorption, declines, the real cls model."""
import numpy as np
import onnx.parser
import pytest

from compiler.ir import const_value, from_onnx, infer_shapes, load
from tests.golden_cases import GOLDEN_ROOT, GoldenCase
from compiler.pass_manager import PassContext, PassKind, PassManager, load_passes, parse_pipeline, verify_outputs
from compiler.runtime import run_model, sample_inputs
from passes.cle import CrossLayerEqualization, _input_ranges, _output_ranges
from tests.large_models import conv_relu_chain


def parse(text: str):
    return from_onnx(infer_shapes(onnx.parser.parse_model(text)))


def context(module, count=4):
    return PassContext(calib_data=sample_inputs(module, PassContext(seed=0), count=count), log=lambda m: None)


def run_cle(module, ctx=None, **options):
    ctx = ctx or context(module)
    result = CrossLayerEqualization(CrossLayerEqualization.Options(**options)).run(module, ctx)
    return result, ctx


def weights(module) -> dict:
    return {t.name: const_value(t) for node in module.graph.nodes for t in node.inputs if const_value(t) is not None}


PAIR = """<ir_version: 8, opset_import: ["" : 13]>
g (float[1,2,4,4] x) => (float[1,2,4,4] y)
  <float[2,2,1,1] w1 = {1.0, -0.5, 0.1, 0.05}, float[2] b1 = {0.2, 0.4},
   float[2,2,1,1] w2 = {0.25, 4.0, -0.5, 2.0}> {
  a = Conv(x, w1, b1)
  r = Relu(a)
  y = Conv(r, w2)
}
"""


def test_pair_scales_match_hand_computation():
    module = parse(PAIR)
    original = module.clone()
    result, _ = run_cle(module)
    # r1 = (1, 0.1) per output channel of w1; r2 = (0.5, 4) per input channel of w2; s = sqrt(r1 / r2).
    s = np.sqrt(np.array([1.0, 0.1]) / np.array([0.5, 4.0]))
    got = weights(module)
    np.testing.assert_allclose(got["w1"].reshape(2, 2), np.array([[1.0, -0.5], [0.1, 0.05]]) / s[:, None], rtol=1e-6)
    np.testing.assert_allclose(got["b1"], np.array([0.2, 0.4]) / s, rtol=1e-6)
    np.testing.assert_allclose(got["w2"].reshape(2, 2), np.array([[0.25, 4.0], [-0.5, 2.0]]) * s[None, :], rtol=1e-6)
    # Both layers now have range sqrt(r1 * r2) on each channel.
    np.testing.assert_allclose(np.abs(got["w1"].reshape(2, 2)).max(axis=1), np.sqrt([0.5, 0.4]), rtol=1e-6)
    assert result.modified and result.stats["pairs-equalized"] == 1
    assert result.stats["range-ratio-max-after"] == pytest.approx(1.0, abs=1e-5)
    assert result.stats["precision-after"] > result.stats["precision-before"]
    verify_outputs(original, module, sample_inputs(original, PassContext(), 3), 1e-5, "cle")


def _chain(module):
    pass_ = CrossLayerEqualization()
    return pass_._links(module.graph, PassContext())


def test_depthwise_triplet_converges_and_is_idempotent():
    module = GoldenCase(GOLDEN_ROOT / "cle" / "depthwise_triplet").load_input()
    original = module.clone()
    result, ctx = run_cle(module)
    links = _chain(module)
    assert len(links) == 2 and links[0].second.node is links[1].first.node  # Conv -> DWConv -> Conv
    for link in links:
        ratio = _output_ranges(link.first) / _input_ranges(link.second)
        np.testing.assert_allclose(ratio, 1.0, rtol=3e-3)
    assert result.stats["sweeps"] > 2  # the shared middle layer needs several sweeps
    verify_outputs(original, module, ctx.calib_data, 1e-5, "cle")
    again, _ = run_cle(module)
    assert not again.modified


def test_paddle_bias_add_is_scaled():
    module = GoldenCase(GOLDEN_ROOT / "cle" / "paddle_bias_add").load_input()
    original = module.clone()
    before = weights(module)["b1"].copy()
    result, ctx = run_cle(module)
    assert result.stats["pairs-equalized"] == 1
    after = weights(module)["b1"]
    assert after.shape == before.shape and not np.allclose(after, before)
    verify_outputs(original, module, ctx.calib_data, 1e-5, "cle")


def test_high_bias_is_absorbed_exactly_on_the_data():
    module = GoldenCase(GOLDEN_ROOT / "cle" / "conv_relu_conv").load_input()
    original = module.clone()
    assert CrossLayerEqualization(CrossLayerEqualization.Options(absorb_bias=True)).kind is not PassKind.FLOAT_PRESERVING
    result, ctx = run_cle(module, absorb_bias=True)
    assert result.stats["bias-absorbed"] >= 1
    relu_input = next(n for n in module.graph.nodes if n.op == "Relu").inputs[0].name
    lows = np.min([out[relu_input].min(axis=(0, 2, 3)) for out in run_model(module, ctx.calib_data, [relu_input])], axis=0)
    assert lows.max() == pytest.approx(0.0, abs=1e-4)  # the always-positive channel now starts at 0
    verify_outputs(original, module, ctx.calib_data, 1e-5, "cle")  # exact on the data the minima came from
    again, _ = run_cle(module, absorb_bias=True)
    assert not again.modified


def test_no_data_means_no_absorption_with_a_remark():
    module = GoldenCase(GOLDEN_ROOT / "cle" / "conv_relu_conv").load_input()
    result, ctx = run_cle(module, ctx=PassContext(log=lambda m: None), absorb_bias=True)
    assert result.stats["pairs-equalized"] == 1 and result.stats["bias-absorbed"] == 0
    assert any("calibration data" in r.message for r in ctx.remarks)


def test_relu6_pair_is_declined_unless_allowed():
    module = GoldenCase(GOLDEN_ROOT / "cle" / "relu6_declined").load_input()
    before = weights(module)
    result, ctx = run_cle(module)
    assert not result.modified
    assert any("not positively homogeneous" in r.message for r in ctx.remarks)
    assert all(np.array_equal(before[k], v) for k, v in weights(module).items())

    allowed = CrossLayerEqualization(CrossLayerEqualization.Options(allow_clip=True))
    assert allowed.kind is not PassKind.FLOAT_PRESERVING  # the manager must not verify it as exact
    assert allowed.run(module, context(module)).stats["pairs-equalized"] == 1


def test_batchnorm_between_convs_is_declined():
    module = parse("""<ir_version: 8, opset_import: ["" : 13]>
g (float[1,2,4,4] x) => (float[1,2,4,4] y)
  <float[2,2,1,1] w1 = {1.0, -0.5, 0.1, 0.05}, float[2,2,1,1] w2 = {0.25, 4.0, -0.5, 2.0},
   float[2] g1 = {1.0, 2.0}, float[2] b = {0.0, 0.1}, float[2] m = {0.1, 0.2}, float[2] v = {1.0, 0.5}> {
  a = Conv(x, w1)
  n = BatchNormalization(a, g1, b, m, v)
  r = Relu(n)
  y = Conv(r, w2)
}
""")
    result, ctx = run_cle(module)
    assert not result.modified
    assert any("fold-bn" in r.message for r in ctx.remarks)


def test_real_cls_model_stays_float_equal(assets):
    from compiler.data import Dataset, ImageOptions, specs_of
    module = load(assets / "models" / "ppocr_cls.onnx", {"x": [1, 3, 48, 192]})
    data = Dataset(assets / "text_cls", specs_of(module), count=12, image=ImageOptions(mean=(0.5,) * 3, std=(0.5,) * 3))
    samples = list(data)
    canonical = "fold-constants,cleanup,upgrade-opset{version=14}" + "".join(
        f",{name}" for name in ("fold-bn", "fuse-hardswish") if name in load_passes())
    PassManager(parse_pipeline(canonical), quiet=True).run(module, PassContext())
    before = module.clone()
    manager = PassManager(parse_pipeline("cle"), verify=True, quiet=True)
    manager.run(module, PassContext(calib_data=samples[:6], log=lambda m: None))  # raises beyond 1e-4 relative
    record = manager.records[-1]
    assert record.modified and record.verify_error is not None and record.verify_error <= 1e-4
    verify_outputs(before, module, samples[6:], 1e-4, "cle")  # images the pass never saw
    assert record.stats["pairs-equalized"] >= 9  # at least the squeeze-excite pairs
    assert record.stats["precision-after"] > record.stats["precision-before"]
    assert record.stats["range-ratio-mean-after"] < record.stats["range-ratio-mean-before"]


def test_gemm_pair_is_equalized():
    module = parse("""<ir_version: 8, opset_import: ["" : 13]>
g (float[2,3] x) => (float[2,2] y)
  <float[4,3] w1 = {1.0, -0.5, 0.2, 0.1, 0.05, -0.02, 3.0, 1.0, 0.5, 0.3, -0.2, 0.1}, float[4] b1 = {0.1, 0.2, 0.0, -0.1},
   float[4,2] w2 = {0.25, 4.0, -0.5, 2.0, 0.1, 0.2, 1.5, -1.0}> {
  a = Gemm <transB = 1> (x, w1, b1)
  r = Relu(a)
  y = MatMul(r, w2)
}
""")
    original = module.clone()
    result, ctx = run_cle(module)
    assert result.stats["pairs-equalized"] == 1
    link = _chain(module)[0]
    np.testing.assert_allclose(_output_ranges(link.first), _input_ranges(link.second), rtol=1e-5)
    verify_outputs(original, module, ctx.calib_data, 1e-5, "cle")


class CountingNodes(list):
    """A graph's node list that counts the nodes every full iteration visits."""
    visits = 0

    def __iter__(self):
        self.visits += len(self)
        return super().__iter__()


def _node_visits(depth: int) -> int:
    module = from_onnx(infer_shapes(conv_relu_chain(depth)))
    module.graph.nodes = CountingNodes(module.graph.nodes)
    result, _ = run_cle(module, PassContext(log=lambda m: None), iterations=3)
    assert result.stats["pairs-equalized"] == depth - 1
    return module.graph.nodes.visits


def test_cle_is_linear_in_depth():
    # Scans of the whole graph per pair (use counts, fresh names) made a 2,500-layer chain take minutes:
    # doubling the depth may at most double the nodes cle's graph scans visit.
    short, long = _node_visits(16), _node_visits(32)
    assert long <= 2.2 * short, (short, long)
