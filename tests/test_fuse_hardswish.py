"""fuse-hardswish: the real models' Clip-based HardSwish become the ONNX op; near-misses and old opsets get remarks."""
import onnx.parser
import pytest

from compiler.ir import from_onnx, infer_shapes
from compiler.pass_manager import PassContext
from passes.fuse_hardswish import FuseHardSwish
from tests.real_models import load_canonical, op_count, run_verified


def parse(text: str):
    return from_onnx(infer_shapes(onnx.parser.parse_model(text)))


def run_fuse(module):
    ctx = PassContext(log=lambda m: None)
    ctx.current_pass = FuseHardSwish.name
    return FuseHardSwish().run(module, ctx), ctx


@pytest.mark.parametrize("name", ["cls", "det"])
def test_real_model_hardswish_fused(assets, name):
    module, ctx = load_canonical(assets, name)
    clips = op_count(module, "Clip")  # every Clip in PP-OCR is the gate of a written-out HardSwish
    assert clips > 0
    manager = run_verified(module, ctx, "fold-bn,fuse-hardswish")  # raises beyond 1e-4 relative
    record = manager.records[-1]
    assert record.verify_error is not None and record.verify_error <= 1e-4
    assert record.stats["hardswish-fused"] == clips
    assert op_count(module, "HardSwish") == clips
    assert op_count(module, "Clip") == 0
    assert not ctx.remarks
    again, _ = run_fuse(module)
    assert not again.modified


PADDLE = """<ir_version: 8, opset_import: ["" : {opset}]>
g (float[1,4,5,5] x) => ({outputs})
  <float[1] three = {{3.0}}, float[1] zero = {{0.0}}, float[1] hi = {{{hi}}}, float[1] six = {{6.0}}> {{
  a = Add(x, three)
  c = Clip(a, zero, hi)
  m = Mul(x, c)
  y = Div(m, six)
}}
"""


def paddle(opset=14, hi=6.0, outputs="float[1,4,5,5] y"):
    return parse(PADDLE.format(opset=opset, hi=hi, outputs=outputs))


def test_paddle_form_becomes_one_op():
    module = paddle()
    result, ctx = run_fuse(module)
    assert result.stats == {"hardswish-fused": 1, "hardsigmoid-fused": 0}
    assert [n.op for n in module.graph.nodes] == ["HardSwish"]
    assert module.graph.nodes[0].outputs[0].name == "y"
    assert not ctx.remarks


def test_clip_to_five_is_a_remarked_near_miss():
    module = paddle(hi=5.0)
    result, ctx = run_fuse(module)
    assert not result.modified
    assert op_count(module, "Clip") == 1
    assert len(ctx.remarks) == 1 and "not HardSwish" in ctx.remarks[0].message


def test_shared_intermediate_is_a_remarked_near_miss():
    module = paddle(outputs="float[1,4,5,5] y, float[1,4,5,5] m")
    result, ctx = run_fuse(module)
    assert not result.modified
    assert len(ctx.remarks) == 1 and "%m has another consumer" in ctx.remarks[0].message


def test_low_opset_declines_with_one_remark():
    module = parse(PADDLE.format(opset=13, hi=6.0, outputs="float[1,4,5,5] y").replace(
        "y = Div(m, six)", "y0 = Div(m, six)\n  a1 = Add(y0, three)\n  c1 = Clip(a1, zero, six)\n"
                           "  m1 = Mul(y0, c1)\n  y = Div(m1, six)"))
    result, ctx = run_fuse(module)
    assert not result.modified
    assert op_count(module, "Clip") == 2
    assert len(ctx.remarks) == 1
    assert "2 HardSwish" in ctx.remarks[0].message and "upgrade-opset{version=14}" in ctx.remarks[0].message
