"""fold-bn: the real models lose every BatchNormalization without changing their float outputs; declines."""
import numpy as np
import onnx.parser
import pytest

from compiler.ir import const_value, from_onnx, infer_shapes
from compiler.pass_manager import PassContext, verify_outputs
from compiler.runtime import sample_inputs
from passes.fold_bn import FoldBatchNorm
from tests.real_models import load_canonical, op_count, run_verified


def parse(text: str):
    return from_onnx(infer_shapes(onnx.parser.parse_model(text)))


def run_fold(module):
    ctx = PassContext(log=lambda m: None)
    ctx.current_pass = FoldBatchNorm.name
    return FoldBatchNorm().run(module, ctx), ctx


@pytest.mark.parametrize("name, expected", [("cls", 35), ("det", 3)])
def test_real_model_has_no_batchnorm_left(assets, name, expected):
    module, ctx = load_canonical(assets, name)
    assert op_count(module, "BatchNormalization") == expected
    manager = run_verified(module, ctx, "fold-bn")  # raises beyond 1e-4 relative
    record = manager.records[-1]
    assert record.stats["bn-folded"] + record.stats["bn-to-affine"] == expected
    assert record.verify_error is not None and record.verify_error <= 1e-4
    assert op_count(module, "BatchNormalization") == 0
    again, _ = run_fold(module)
    assert not again.modified


def test_graph_without_batchnorm_is_declined_cleanly():
    module = parse("""<ir_version: 8, opset_import: ["" : 13]>
g (float[1,2,4,4] x) => (float[1,2,4,4] y) <float[2,2,1,1] w = {1.0, 0.5, -0.5, 2.0}> {
  c = Conv(x, w)
  y = Relu(c)
}
""")
    result, ctx = run_fold(module)
    assert not result.modified
    assert result.stats == {"bn-folded": 0, "bn-to-affine": 0, "weights-copied": 0}
    assert not ctx.remarks


SHARED_WEIGHT = """<ir_version: 8, opset_import: ["" : 13]>
g (float[1,2,3,3] x) => (float[1,2,3,3] y)
  <float[2,2,1,1] w = {1.0, 0.5, -0.5, 2.0}, float[2] g1 = {2.0, 0.5}, float[2] g2 = {3.0, 1.0},
   float[2] z = {0.0, 0.0}, float[2] one = {1.0, 1.0}> {
  c1 = Conv(x, w)
  b1 = BatchNormalization <epsilon = 0.0> (c1, g1, z, z, one)
  c2 = Conv(b1, w)
  y = BatchNormalization <epsilon = 0.0> (c2, g2, z, z, one)
}
"""


def test_shared_weight_is_copied_with_a_remark():
    module = parse(SHARED_WEIGHT)
    original = module.clone()
    result, ctx = run_fold(module)
    assert result.stats == {"bn-folded": 2, "bn-to-affine": 0, "weights-copied": 1}
    assert len(ctx.remarks) == 1 and "shared" in ctx.remarks[0].message
    convs = [n for n in module.graph.nodes if n.op == "Conv"]
    assert convs[0].inputs[1] is not convs[1].inputs[1]
    w = np.array([1.0, 0.5, -0.5, 2.0]).reshape(2, 2, 1, 1)
    np.testing.assert_allclose(const_value(convs[0].inputs[1]), w * np.array([2.0, 0.5]).reshape(2, 1, 1, 1), rtol=1e-6)
    np.testing.assert_allclose(const_value(convs[1].inputs[1]), w * np.array([3.0, 1.0]).reshape(2, 1, 1, 1), rtol=1e-6)
    verify_outputs(original, module, sample_inputs(original, PassContext(), 2), 1e-5, "fold-bn")


def test_training_mode_batchnorm_is_left_with_a_remark():
    module = parse("""<ir_version: 8, opset_import: ["" : 15]>
g (float[2,2,3,3] x) => (float[2,2,3,3] y, float[2] rm, float[2] rv)
  <float[2] g1 = {2.0, 0.5}, float[2] z = {0.0, 0.0}, float[2] one = {1.0, 1.0}> {
  y, rm, rv = BatchNormalization <training_mode = 1> (x, g1, z, z, one)
}
""")
    result, ctx = run_fold(module)
    assert not result.modified
    assert op_count(module, "BatchNormalization") == 1
    assert len(ctx.remarks) == 1 and "training_mode" in ctx.remarks[0].message


def test_affine_rewrite_remarks_why():
    module = parse("""<ir_version: 8, opset_import: ["" : 13]>
g (float[1,2,3,3] x) => (float[1,2,3,3] y)
  <float[2] g1 = {2.0, 0.5}, float[2] b = {0.1, -0.2}, float[2] m = {0.3, 0.0}, float[2] v = {1.0, 4.0}> {
  y = BatchNormalization (x, g1, b, m, v)
}
""")
    original = module.clone()
    result, ctx = run_fold(module)
    assert result.stats["bn-to-affine"] == 1
    assert "graph input" in ctx.remarks[0].message
    assert [n.op for n in module.graph.nodes] == ["Mul", "Add"]
    verify_outputs(original, module, sample_inputs(original, PassContext(), 2), 1e-5, "fold-bn")
