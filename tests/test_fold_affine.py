"""fold-affine: PP-OCR det's learnable affine blocks and ConvTranspose bias Adds vanish into the layers."""
import onnx.parser

from compiler.ir import from_onnx, infer_shapes
from compiler.pass_manager import PassContext
from passes.fold_affine import FoldAffine
from tests.real_models import load_canonical, op_count, run_verified


def run_fold(module):
    ctx = PassContext(log=lambda m: None)
    ctx.current_pass = FoldAffine.name
    return FoldAffine().run(module, ctx), ctx


def parse(text: str):
    return from_onnx(infer_shapes(onnx.parser.parse_model(text)))


def convtranspose_followed_by_add(module) -> int:
    return sum(1 for node in module.graph.nodes if node.op == "ConvTranspose"
               and any(c.op == "Add" for c in node.outputs[0].outputs))


def test_real_det_affine_blocks_folded(assets):
    module, ctx = load_canonical(assets, "det")
    muls, adds = op_count(module, "Mul"), op_count(module, "Add")
    manager = run_verified(module, ctx, "fold-bn,fuse-hardswish,fold-affine")  # raises beyond 1e-4 relative
    record = manager.records[-1]
    assert record.verify_error is not None and record.verify_error <= 1e-4
    # 28 Conv -> Mul -> Add blocks and 2 ConvTranspose bias Adds into their producers; 10 of the 23
    # activation -> Mul -> Add blocks read by a 1x1 Conv into it, the 13 before a padded depthwise Conv kept
    assert record.stats == {"into-producer": 2 * 28 + 2, "into-consumers": 2 * 10, "gemm-scales": 0}
    assert sum("pads with zeros" in str(r) for r in ctx.remarks) == 13
    assert convtranspose_followed_by_add(module) == 0
    assert op_count(module, "Mul") + op_count(module, "Add") == muls + adds - 2 * 24 - 78  # HardSwish's 2 a block, then these
    assert not run_fold(module)[0].modified


def test_output_read_by_a_second_consumer_is_not_folded_into_the_producer():
    module = parse("""<ir_version: 8, opset_import: ["" : 13]>
g (float[1,3,4,4] x) => (float[1,2,4,4] y, float[1,2,4,4] c)
  <float[2,3,1,1] w = {1, 2, 3, 4, 5, 6}, float[1,2,1,1] b = {0.5, -0.5}> {
  c = Conv (x, w)
  y = Add(c, b)
}""")
    result, _ = run_fold(module)
    assert not result.modified and op_count(module, "Add") == 1


def test_add_before_a_padded_conv_is_declined_with_a_remark():
    module = parse("""<ir_version: 8, opset_import: ["" : 13]>
g (float[1,2,3,3] x) => (float[1,1,3,3] y)
  <float[1,2,3,3] w = {1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3, 4, 5, 6, 7, 8, 9}, float[1] t = {0.5}> {
  r = Relu(x)
  a = Add(r, t)
  y = Conv <pads = [1,1,1,1]> (a, w)
}""")
    result, ctx = run_fold(module)
    assert not result.modified
    assert len(ctx.remarks) == 1 and "pads with zeros" in str(ctx.remarks[0])


def test_mul_read_by_a_non_linear_op_is_kept():
    module = parse("""<ir_version: 8, opset_import: ["" : 13]>
g (float[1,2,3,3] x) => (float[1,2,3,3] y)
  <float[1] k = {0.5}> {
  r = Relu(x)
  m = Mul(r, k)
  y = Sigmoid(m)
}""")
    result, ctx = run_fold(module)
    assert not result.modified and not ctx.remarks


def test_input_normalisation_folds_into_an_unpadded_first_conv():
    module = parse("""<ir_version: 8, opset_import: ["" : 13]>
g (float[1,2,4,4] x) => (float[1,1,4,4] y)
  <float[1,2,1,1] mean = {0.5, 0.25}, float[1,2,1,1] std = {0.5, 2.0}, float[1,2,1,1] w = {1.5, -1}, float[1] b = {0.1}> {
  c = Sub(x, mean)
  s = Div(c, std)
  y = Conv (s, w, b)
}""")
    result, _ = run_fold(module)
    assert result.stats == {"into-producer": 0, "into-consumers": 2, "gemm-scales": 0}
    (conv,) = module.graph.nodes
    assert conv.op == "Conv" and conv.inputs[0].name == "x"
    # y = 1.5 (x0 - 0.5) / 0.5 - (x1 - 0.25) / 2 + 0.1 = 3 x0 - 0.5 x1 - 1.5 + 0.125 + 0.1
    assert conv.inputs[1].values.reshape(-1).tolist() == [3.0, -0.5]
    assert abs(float(conv.inputs[2].values[0]) - (-1.275)) < 1e-6


def test_a_constant_minus_or_over_a_tensor_is_not_affine_in_that_form():
    module = parse("""<ir_version: 8, opset_import: ["" : 13]>
g (float[1,2,4,4] x) => (float[1,1,4,4] y)
  <float[1] one = {1.0}, float[1,2,1,1] w = {1.5, -1}> {
  c = Sub(one, x)
  y = Conv (c, w)
}""")
    result, _ = run_fold(module)
    assert not result.modified
