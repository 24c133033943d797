"""replace-se on the real PP-OCR models and on small graphs (remarks, dynamic batch)."""
import numpy as np
import onnx.parser
import pytest

from compiler.ir import from_onnx, infer_shapes, load
from compiler.pass_manager import PassContext, PassManager, parse_pipeline
from compiler.runtime import run_model

MODELS = {
    # input shape, text-image folder, PP-OCR's input normalisation, SE blocks in the model
    # (cls: its tenth GlobalAveragePool is the classifier head, GAP -> Reshape -> MatMul)
    "cls": ([1, 3, 48, 192], "text_cls", ((0.5,) * 3, (0.5,) * 3), 9),
    "det": ([1, 3, 320, 320], "text_det", ((0.5,) * 3, (0.5,) * 3), 10),
}
MODES = ("fc+fold-gate", "fc", "fold-gate")


def parse(text):
    return from_onnx(infer_shapes(onnx.parser.parse_model(text)))


def run(module, pipeline, data=None, verify=True):
    ctx = PassContext(log=lambda message: None, calib_data=data)
    manager = PassManager(parse_pipeline(pipeline), verify=verify, quiet=True)
    manager.run(module, ctx)
    return manager.records[-1], ctx


@pytest.fixture(scope="module")
def real_models(assets):
    """name -> (module after fold-constants,cleanup, two text-image samples)."""
    from compiler.data import Dataset, ImageOptions, specs_of
    out = {}
    for name, (shape, folder, (mean, std), _) in MODELS.items():
        module = load(assets / "models" / f"ppocr_{name}.onnx", {"x": shape})
        data = list(Dataset(assets / folder, specs_of(module), count=2, image=ImageOptions(mean=mean, std=std)))
        run(module, "fold-constants,cleanup", data)
        out[name] = (module, data)
    return out


def gate_inputs(module):
    """The gate tensor of every Mul that scales a GlobalAveragePool's input: where SE gates apply."""
    pooled = {id(n.inputs[0]) for n in module.graph.nodes if n.op == "GlobalAveragePool"}
    return [t for n in module.graph.nodes if n.op == "Mul" and any(id(t) in pooled for t in n.inputs)
            for t in n.inputs if id(t) not in pooled]


def gate_op(tensor):
    """The op computing a gate, looking through the Reshape back to (N, C, 1, 1)."""
    node = tensor.inputs[0]
    return node.inputs[0].inputs[0].op if node.op == "Reshape" else node.op


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_real_model_blocks_rewritten_float_exactly(real_models, name, mode):
    canonical, data = real_models[name]
    blocks = MODELS[name][3]
    module = canonical.clone()
    assert len(gate_inputs(module)) == blocks
    assert {gate_op(g) for g in gate_inputs(module)} == {"HardSigmoid"}

    record, ctx = run(module, f"replace-se{{mode={mode}}}", data)  # verify raises beyond 1e-4

    assert record.stats == {"se-matched": blocks, "se-rewritten": blocks}
    assert record.verify_error is not None and record.verify_error <= 1e-4
    assert not ctx.remarks
    pool_readers = [u.op for n in module.graph.nodes if n.op == "GlobalAveragePool" for u in n.outputs[0].outputs]
    if "fc" in mode:
        assert "Conv" not in pool_readers
        assert sum(n.op == "Gemm" for n in module.graph.nodes) == 2 * blocks
    else:
        assert pool_readers.count("Conv") == blocks
    gates = gate_inputs(module)
    assert len(gates) == blocks
    assert {gate_op(g) for g in gates} == {"Clip" if "fold-gate" in mode else "HardSigmoid"}
    assert all(module.annotations[g.name]["fixed_range"] == (0.0, 1.0) for g in gates)

    again, _ = run(module, f"replace-se{{mode={mode}}}", data)
    assert not again.modified and again.stats == {"se-matched": blocks, "se-rewritten": 0}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_fixed_range_tensors_hold_values_in_unit_interval(real_models, name):
    canonical, data = real_models[name]
    module = canonical.clone()
    run(module, "replace-se{keep-16bit=true}", data, verify=False)
    fixed = sorted(n for n, hints in module.annotations.items() if "fixed_range" in hints)
    wide = sorted(n for n, hints in module.annotations.items() if hints.get("act_bits") == 16)
    # Two per block (the (N, C) gate and its reshape); the 16-bit set adds pool, flatten, both layers, Relu.
    assert len(fixed) == 2 * MODELS[name][3] and set(fixed) < set(wide)
    assert len(wide) == 7 * MODELS[name][3]
    for sample in run_model(module, data, outputs=fixed):
        for tensor, values in sample.items():
            assert values.min() >= 0.0 and values.max() <= 1.0, tensor
    # What the fixed range saves: the folded gate's input spans more than [0, 1] on real images.
    tensors = module.graph.tensors()
    clip_inputs = [tensors[n].inputs[0].inputs[0].name for n in fixed if tensors[n].inputs[0].op == "Clip"]
    assert clip_inputs
    spans = [float(v.max() - v.min()) for sample in run_model(module, data, outputs=clip_inputs) for v in sample.values()]
    assert max(spans) > 1.0


def se_text(*, conv1="c1 = Conv(p, w1, b1)", mul="y = Mul(x, g)", extra="", batch="1", outputs="float[1,4,3,3] y",
            w1_shape="[2,4,1,1]"):
    """A small SE block (opset 13) with one line swappable, for near-misses."""
    rng = np.random.default_rng(1)

    def values(n):
        return ", ".join(f"{v:.2f}" for v in rng.uniform(-1, 1, n))
    w1_size = int(np.prod([int(d) for d in w1_shape.strip("[]").split(",")]))
    return f"""<ir_version: 8, opset_import: ["" : 13]>
g (float[{batch},4,3,3] x) => ({outputs}) <float{w1_shape} w1 = {{{values(w1_size)}}}, float[2] b1 = {{{values(2)}}},
  float[4,2,1,1] w2 = {{{values(8)}}}, float[4] b2 = {{{values(4)}}}> {{
  p = GlobalAveragePool(x)
  {conv1}
  r = Relu(c1)
  c2 = Conv(r, w2, b2)
  g = HardSigmoid <alpha = 0.2, beta = 0.5> (c2)
  {mul}
  {extra}
}}"""


@pytest.mark.parametrize("text, reason", [
    (se_text(conv1="c1 = Conv <pads = [1,1,1,1]> (p, w1, b1)", w1_shape="[2,4,3,3]"), "kernel [3, 3], not 1x1"),
    (se_text(conv1="c1 = Conv <group = 2> (p, w1, b1)", w1_shape="[2,2,1,1]"), "group=2"),
    (se_text(mul="n = Neg(x)\n  y = Mul(n, g)"), "multiplies %n, not the block input %x"),
    (se_text(outputs="float[1,4,3,3] y, float[1,4,3,3] y2", extra="y2 = Mul(x, g)"), "the gate %g feeds 2 nodes"),
    (se_text(outputs="float[1,4,3,3] y, float[1,4,1,1] g"), "the gate %g is a graph output"),
])
def test_near_misses_are_declined_with_a_remark(text, reason):
    module = parse(text)
    record, ctx = run(module, "replace-se", verify=False)
    assert not record.modified and record.stats == {"se-matched": 0, "se-rewritten": 0}
    assert len(ctx.remarks) == 1 and reason in ctx.remarks[0].message, ctx.remarks


def test_classifier_head_is_not_a_candidate():
    module = parse("""<ir_version: 8, opset_import: ["" : 13]>
g (float[1,4,3,3] x) => (float[1,2] y) <int64[2] flat = {1, 4}, float[4,2] w = {1, 2, 3, 4, 5, 6, 7, 8}> {
  p = GlobalAveragePool(x)
  f = Reshape(p, flat)
  m = MatMul(f, w)
  y = Softmax(m)
}""")
    record, ctx = run(module, "replace-se", verify=False)
    assert not record.modified and record.stats["se-matched"] == 0 and not ctx.remarks


def test_dynamic_batch_reshapes_back_with_inferred_batch():
    original = parse(se_text(batch="N", outputs="float[N,4,3,3] y"))
    module = original.clone()
    record, _ = run(module, "replace-se", verify=False)
    assert record.stats == {"se-matched": 1, "se-rewritten": 1}
    reshape = next(n for n in module.graph.nodes if n.op == "Reshape")
    assert reshape.inputs[1].values.tolist() == [-1, 4, 1, 1]
    samples = [{"x": np.random.default_rng(3).standard_normal((3, 4, 3, 3)).astype(np.float32)}]
    np.testing.assert_allclose(run_model(module, samples)[0]["y"], run_model(original, samples)[0]["y"], rtol=1e-5, atol=1e-6)
