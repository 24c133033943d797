"""fuse-gelu: the remarks on Erfs it does not fuse (the rewrites themselves are golden cases)."""
import onnx.parser
import pytest

from compiler.ir import from_onnx, infer_shapes
from compiler.pass_manager import PassContext, PassManager, parse_pipeline

HEADER = '<ir_version: 8, opset_import: ["" : 13]>\n'
CONSTS = "<float sqrt2 = {1.4142135}, float one = {1.0}, float half = {0.5}>"


def fuse(body: str, outputs: str = "float[1,4] y"):
    module = from_onnx(infer_shapes(onnx.parser.parse_model(f"{HEADER}g (float[1,4] x) => ({outputs}) {CONSTS} {{{body}}}")))
    ctx = PassContext(log=lambda message: None)
    manager = PassManager(parse_pipeline("fuse-gelu"), verify=True, quiet=True)
    manager.run(module, ctx)
    return manager.records[-1], [r.message for r in ctx.remarks]


@pytest.mark.parametrize("body, outputs, reason", [
    ("d = Div(x, sqrt2)\n e = Erf(d)\n t = Add(e, one)\n y = Mul(x, t)", "float[1,4] y", "run fuse-gelu before it"),
    ("y = Erf(x)", "float[1,4] y", "its input is not x / sqrt(2)"),
    ("d = Div(x, sqrt2)\n e = Erf(d)\n y = Add(e, half)", "float[1,4] y", "not 1 + erf"),
    ("d = Div(x, sqrt2)\n e = Erf(d)\n t = Add(e, one)\n m = Mul(x, t)\n y = Mul(m, half)",
     "float[1,4] y, float[1,4] t", "1 + erf %t feeds other nodes or is a graph output"),
])
def test_declined_erf_gets_a_remark(body, outputs, reason):
    record, remarks = fuse(body, outputs)
    assert not record.modified and len(remarks) == 1 and reason in remarks[0]


def test_fused_gelu_reports_its_count():
    record, remarks = fuse("d = Div(x, sqrt2)\n e = Erf(d)\n t = Add(e, one)\n m = Mul(x, t)\n y = Mul(m, half)")
    assert record.modified and record.stats == {"gelu-fused": 1} and not remarks
