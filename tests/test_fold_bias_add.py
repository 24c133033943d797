"""fold-bias-add: det's ConvTranspose bias Adds become the layer's own bias (HTP drops them otherwise)."""
import onnx.parser

from compiler.ir import from_onnx, infer_shapes
from compiler.pass_manager import PassContext
from passes.fold_bias_add import FoldBiasAdd
from tests.real_models import load_canonical, op_count, run_verified


def run_fold(module):
    ctx = PassContext(log=lambda m: None)
    ctx.current_pass = FoldBiasAdd.name
    return FoldBiasAdd().run(module, ctx), ctx


def convtranspose_followed_by_constant_add(module) -> int:
    return sum(1 for node in module.graph.nodes if node.op == "ConvTranspose"
               and any(c.op == "Add" for c in node.outputs[0].outputs))


def test_real_det_convtranspose_adds_folded(assets):
    module, ctx = load_canonical(assets, "det")
    adds = op_count(module, "Add")
    manager = run_verified(module, ctx, "fold-bn,fold-bias-add")  # raises beyond 1e-4 relative
    record = manager.records[-1]
    assert record.verify_error is not None and record.verify_error <= 1e-4
    assert record.stats["adds-folded"] >= 2
    assert convtranspose_followed_by_constant_add(module) == 0
    assert op_count(module, "Add") == adds - record.stats["adds-folded"]
    assert not run_fold(module)[0].modified


def test_add_read_by_a_second_consumer_is_not_folded():
    module = from_onnx(infer_shapes(onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 13]>
g (float[1,3,4,4] x) => (float[1,2,4,4] y, float[1,2,4,4] c)
  <float[2,3,1,1] w = {1, 2, 3, 4, 5, 6}, float[1,2,1,1] b = {0.5, -0.5}> {
  c = Conv (x, w)
  y = Add(c, b)
}""")))
    result, _ = run_fold(module)
    assert not result.modified and op_count(module, "Add") == 1


def test_constant_varying_over_space_is_declined_with_a_remark():
    module = from_onnx(infer_shapes(onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 13]>
g (float[1,3,2,2] x) => (float[1,2,2,2] y)
  <float[2,3,1,1] w = {1, 2, 3, 4, 5, 6}, float[1,1,2,2] plane = {1, 2, 3, 4}> {
  c = Conv (x, w)
  y = Add(c, plane)
}""")))
    result, ctx = run_fold(module)
    assert not result.modified
    assert len(ctx.remarks) == 1 and "one value per output channel" in str(ctx.remarks[0])
