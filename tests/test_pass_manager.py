"""The pipeline parser, typed options, registry errors and the manager's verify/dump."""
import dataclasses
import re

import numpy as np
import onnx_graphsurgeon as gs
import onnx.parser
import pytest

from compiler.ir import QccError, from_onnx, infer_shapes
from compiler.pass_manager import (REGISTRY, Pass, PassContext, PassKind, PassManager, PassResult,
                                   load_passes, parse_pipeline, register, remark_lines)

TINY = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[1,4] x) => (float[1,4] y) {
  a = Identity(x)
  y = Relu(a)
}
"""


def tiny_module():
    return from_onnx(infer_shapes(onnx.parser.parse_model(TINY)))


class _ScaleOutputs(Pass):
    """Test-only pass that breaks float equivalence (doubles the graph output)."""
    name = "test-break-float"
    kind = PassKind.FLOAT_PRESERVING

    @dataclasses.dataclass(frozen=True)
    class Options:
        factor: float = 2.0
        enabled: bool = True

    def run(self, module, ctx):
        graph = module.graph
        out = graph.outputs[0]
        if not self.options.enabled or out.inputs[0].op == "Mul":
            return PassResult(False)
        inner = gs.Variable(out.name + "_raw", dtype=out.dtype, shape=out.shape)
        out.inputs[0].outputs[0] = inner
        graph.nodes.append(gs.Node("Mul", inputs=[inner, gs.Constant("k", np.array(self.options.factor, np.float32))], outputs=[out]))
        return PassResult(True, {"scaled": 1})


def test_parse_round_trips_with_every_option():
    pipeline = parse_pipeline("cleanup, upgrade-opset{version=14},test-break-float{factor=3}")
    text = str(pipeline)
    assert text == "cleanup,upgrade-opset{version=14},test-break-float{factor=3.0 enabled=true}"
    assert str(parse_pipeline(text)) == text


def test_options_are_typed():
    (p,) = parse_pipeline("test-break-float{factor=0.5 enabled=false}")
    assert p.options.factor == 0.5 and p.options.enabled is False


@pytest.mark.parametrize("text, message", [
    ("no-such-pass", "unknown pass 'no-such-pass'; valid passes:"),
    ("upgrade-opset{verison=13}", "unknown option 'verison'; valid options: version"),
    ("upgrade-opset{version=thirteen}", "option 'version' expects int, got 'thirteen'"),
    ("test-break-float{enabled=maybe}", "option 'enabled' expects bool"),
    ("upgrade-opset{version=13", "missing '}'"),
    ("cleanup,,fold-constants", "empty pass name"),
    ("upgrade-opset{version}", "must be key=value"),
])
def test_parse_errors_name_the_problem(text, message):
    with pytest.raises(QccError, match=None) as info:
        parse_pipeline(text)
    assert message in str(info.value)


def test_unknown_pass_lists_valid_ones():
    with pytest.raises(QccError) as info:
        parse_pipeline("nope")
    for name in load_passes():
        assert name in str(info.value)


def test_every_registered_pass_is_documented_and_has_frozen_options():
    for name, cls in load_passes().items():
        assert cls.summary(), f"{name} has no docstring summary"
        assert cls.Options.__dataclass_params__.frozen
        assert isinstance(cls.kind, PassKind)


def test_manager_records_stats_and_pipeline_metadata():
    module = tiny_module()
    manager = PassManager(parse_pipeline("cleanup"), quiet=True)
    manager.run(module, PassContext())
    (record,) = manager.records
    assert record.modified and record.stats["pass-through-removed"] == 1
    assert module.metadata["qcc.pipeline"] == "cleanup"
    assert [n.op for n in module.graph.nodes] == ["Relu"]


def test_verify_names_the_pass_that_changed_the_result():
    module = tiny_module()
    manager = PassManager(parse_pipeline("cleanup,test-break-float"), verify=True, quiet=True)
    with pytest.raises(QccError, match="pass 'test-break-float' changed the float outputs"):
        manager.run(module, PassContext())


def test_verify_passes_for_float_preserving_rewrites():
    module = tiny_module()
    manager = PassManager(parse_pipeline("cleanup"), verify=True, quiet=True)
    manager.run(module, PassContext())
    assert manager.records[0].verify_error == 0.0


def test_dump_after_writes_printer_text(tmp_path):
    module = tiny_module()
    manager = PassManager(parse_pipeline("cleanup,test-break-float"), dump_after="all", dump_dir=tmp_path, quiet=True)
    manager.run(module, PassContext())
    dumps = sorted(p.name for p in tmp_path.iterdir())
    assert dumps == ["01-cleanup.txt", "02-test-break-float.txt"]
    assert "Mul(" in (tmp_path / "02-test-break-float.txt").read_text()


def test_remarks_carry_pass_and_node():
    ctx = PassContext()
    ctx.current_pass = "fold-bn"
    node = gs.Node("Conv", name="conv1")
    ctx.remark(node, "shared weight")
    assert str(ctx.remarks[0]) == "remark [fold-bn] conv1 (Conv): shared weight"


def test_a_remark_repeated_on_many_nodes_is_logged_once_with_the_count():
    ctx = PassContext()
    ctx.current_pass = "cle"
    for i in range(5):
        ctx.remark(gs.Node("HardSwish", name=f"hs{i}"), "not positively homogeneous")
    ctx.remark(gs.Node("Conv", name="c"), "shared weight")
    ctx.remark(gs.Node("Conv", name="d"), "shared weight")
    assert remark_lines(ctx.remarks) == [
        "remark [cle] 5 nodes (hs0 (HardSwish), hs1 (HardSwish), hs2 (HardSwish), ...): not positively homogeneous",
        "remark [cle] c (Conv): shared weight",
        "remark [cle] d (Conv): shared weight",
    ]
    assert len(ctx.remarks) == 7  # the context (and the report) keeps every one


@pytest.fixture(autouse=True, scope="module")
def _registered_test_pass():
    register(_ScaleOutputs)
    yield
    REGISTRY.pop(_ScaleOutputs.name, None)


@pytest.mark.parametrize("text, message", [
    ("insert-qdq,calibrate", "'insert-qdq' must run after 'calibrate', not before it"),
    ("calibrate,insert-qdq,propagate-encodings", "'insert-qdq' must run after 'propagate-encodings'"),
    ("calibrate,bias-correction,adaround", "'bias-correction' must run after 'adaround'"),
    ("calibrate,cle", "'cle' (float-preserving) cannot run after 'calibrate' (annotating)"),
    ("insert-qdq,fold-bn", "'fold-bn' (float-preserving) cannot run after 'insert-qdq' (lowering)"),
    ("calibrate,insert-converts", "'insert-converts' needs 'insert-qdq' before it"),
])
def test_pipeline_contracts_are_checked_when_parsed(text, message):
    with pytest.raises(QccError, match=re.escape(message)):
        parse_pipeline(text)


def test_every_target_pipeline_keeps_the_contracts():
    from compiler.quantize import with_mixed_precision
    from compiler.targets import TARGETS
    for name, target in TARGETS.items():
        for act_bits in (8, 16):
            pipeline = target.build(act_bits=act_bits) if name in ("htp", "dsp", "hta") else target.build()
            assert str(parse_pipeline(str(pipeline))) == str(pipeline)
    mixed = with_mixed_precision(TARGETS["htp"].build(), 0.999)
    assert str(parse_pipeline(str(mixed))) == str(mixed)
