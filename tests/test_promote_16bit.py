"""promote-16bit and insert-converts: the simulation is the model they write, the costly tensor is promoted,
the budget holds, widths agree per op, and the mixed-precision model runs on HTP."""
import numpy as np
import onnx
import onnx.parser
import pytest

from tests.golden_cases import GOLDEN_ROOT
from compiler.ir import QccError, from_onnx, infer_shapes
from compiler.layer_analysis import ErrorStats, Reference
from compiler.pass_manager import PassContext, PassManager, make_pass, parse_pipeline
from compiler.runtime import make_session
from compiler.qdq import rebit
from passes.insert_converts import output_width
from compiler.encoding import activation_encoding
from compiler.config import QuantConfig
from compiler.quantsim import MixedPrecisionSim
from passes.promote_16bit import constant_encodings, promotion_units, sixteen_bit_encodings, wide_weight_layers

# Conv (bias) -> Relu -> Add(constant) -> Conv (bias) -> Mul(constant) -> Concat with x -> Conv: biases and
# activation-like constants whose quantization follows a width, and a shared-encoding Concat.
MODEL = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[1,4,8,8] x) => (float[1,4,8,8] y) {
  c1 = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
  r1 = Relu(c1)
  a = Add(r1, k)
  c2 = Conv(a, w2, b2)
  m = Mul(c2, half)
  cat = Concat <axis = 1> (m, x)
  y = Conv(cat, w3)
}
"""
SHAPES = {"w1": [4, 4, 3, 3], "b1": [4], "w2": [4, 4, 1, 1], "b2": [4], "w3": [4, 8, 1, 1], "k": [1, 4, 1, 1], "half": [1]}


def model(overflowing_bias: bool = False) -> onnx.ModelProto:
    """``overflowing_bias``: c2's int32 bias overflows at a 16-bit input scale, so insert-qdq raises its weight scale."""
    proto = onnx.parser.parse_model(MODEL)
    rng = np.random.default_rng(0)
    values = {name: rng.standard_normal(shape).astype(np.float32) * 0.5 for name, shape in SHAPES.items()}
    if overflowing_bias:
        values["w2"] *= 1e-3
        values["b2"] = np.full(4, 1e4, dtype=np.float32)
    proto.graph.initializer.extend(onnx.numpy_helper.from_array(v, name) for name, v in values.items())
    return infer_shapes(proto)


def samples(count=4, seed=1):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 4, 8, 8)).astype(np.float32)} for _ in range(count)]


def calibrated(proto=None):
    module = from_onnx(proto if proto is not None else model())
    ctx = PassContext(calib_data=samples(), log=lambda message: None)
    PassManager(parse_pipeline("calibrate{method=minmax},propagate-encodings"), quiet=True).run(module, ctx)
    return module, ctx


def lowered(module, wide=(), constants=True, sixteen_bit=None):
    """insert-qdq + insert-converts on a clone with ``wide`` tensors (and, as promote-16bit leaves them, their
    nodes' constants) at 16 bits: their ``sixteen_bit`` encodings, else their ranges re-derived."""
    module = module.clone()
    for name in wide:
        narrow = module.encodings[name]  # as promote-16bit records it: converts down go to the 8-bit range
        module.annotate(name, act_bits=16, narrow=(float(narrow.min[0]), float(narrow.max[0])))
        module.encodings[name] = (sixteen_bit or {}).get(name) or rebit(module.encodings[name], 16)
    if constants:
        module.encodings.update(constant_encodings(module, set(wide)))
    ctx = PassContext(log=lambda message: None)
    make_pass("insert-qdq").run(module, ctx)
    result = make_pass("insert-converts").run(module, ctx)
    return module, result


@pytest.mark.parametrize("overflowing_bias", [False, True], ids=["plain", "weight-scale-raised"])
def test_simulation_is_the_lowered_model_bit_for_bit(overflowing_bias):
    module, _ = calibrated(model(overflowing_bias))
    data = samples(2, seed=5)
    sim = MixedPrecisionSim(module, QuantConfig(), data)
    reference = make_session(sim.float_model)
    names = set(module.encodings)
    for wide in ([], ["c1", "r1"], ["a", "c2"], ["m", "x", "cat"], sorted(names)):
        encodings = {**module.encodings, **{n: rebit(module.encodings[n], 16) for n in wide}}
        simulated = sim.measure(encodings)
        real_module, _ = lowered(module, wide)
        session, stats = make_session(real_module.to_onnx()), ErrorStats()
        for sample in data:
            stats.update(Reference(reference.run(["y"], sample)[0]), session.run(["y"], sample)[0])
        assert (simulated.cos, simulated.error) == (stats.cos, stats.noise / stats.signal), wide


def test_a_reader_whose_bias_a_convert_up_would_saturate_shares_its_inputs_width():
    """c2's int32 bias overflows at a 16-bit input scale: c2 at 16 bits beside an 8-bit input would need its input
    converted up and its bias saturated (the model at cosine 0.71 here), so every unit holds both or neither,
    and what each unit writes is what the simulation measured."""
    module, _ = calibrated(model(overflowing_bias=True))
    data = samples(2, seed=5)
    sim = MixedPrecisionSim(module, QuantConfig(), data)
    saturating = sim.saturating_up_converts()
    assert saturating == [("a", "c2")]
    units = promotion_units(module, set(module.encodings), saturating)
    assert all(("a" in unit) == ("c2" in unit) for unit in units)
    reference = make_session(sim.float_model)
    for unit in units:
        simulated = sim.measure({**module.encodings, **{n: rebit(module.encodings[n], 16) for n in unit}})
        real_module, _ = lowered(module, unit)
        session, stats = make_session(real_module.to_onnx()), ErrorStats()
        for sample in data:
            stats.update(Reference(reference.run(["y"], sample)[0]), session.run(["y"], sample)[0])
        assert (simulated.cos, simulated.error) == (stats.cos, stats.noise / stats.signal), unit


def lowered_with_wide_weights(module, wide, layers):
    """``lowered`` with the weights of the layers whose output is in ``wide`` at 16 bits, as promote-16bit annotates them."""
    module = module.clone()
    for weight, (_, output) in layers.items():
        if output in wide:
            module.annotate(weight, weight_bits=16)
    return lowered(module, wide)


def test_with_16_bit_weights_on_wide_layers_the_simulation_is_the_lowered_model_bit_for_bit():
    """Each layer reads the weight and bias of its (input width, output width): the four lowerings, picked at run
    time, against insert-qdq + insert-converts with the weights promote-16bit would annotate."""
    module, _ = calibrated()
    data = samples(2, seed=5)
    layers = wide_weight_layers(module, set(module.encodings), QuantConfig())
    assert set(layers) == {"w1", "w2", "w3"}
    sim = MixedPrecisionSim(module, QuantConfig(), data, wide_weights=frozenset(layers))
    reference = make_session(sim.float_model)
    for wide in ([], ["c1", "r1"], ["a", "c2"], ["c2"], ["a"], ["m", "x", "cat"], ["y"], sorted(module.encodings)):
        simulated = sim.measure({**module.encodings, **{n: rebit(module.encodings[n], 16) for n in wide}})
        real_module, _ = lowered_with_wide_weights(module, wide, layers)
        stored = {n.inputs[1].name: n.inputs[1].inputs[0].inputs[0].values.dtype for n in real_module.graph.nodes
                  if n.op == "Conv"}
        assert sorted(str(d) for d in stored.values()) == sorted(
            "int16" if layers[w][1] in wide else "int8" for w in layers), wide
        session, stats = make_session(real_module.to_onnx()), ErrorStats()
        for sample in data:
            stats.update(Reference(reference.run(["y"], sample)[0]), session.run(["y"], sample)[0])
        assert (simulated.cos, simulated.error) == (stats.cos, stats.noise / stats.signal), wide


def test_wide_layers_take_16_bit_weights_only_where_the_generation_takes_them():
    module, _ = calibrated()
    assert wide_weight_layers(module, set(module.encodings), QuantConfig(htp_arch="68")) == {}
    assert wide_weight_layers(module, set(module.encodings), QuantConfig(htp_arch="none")) == {}
    promoted_module = module.clone()
    ctx = PassContext(calib_data=samples(), log=lambda message: None)
    result = make_pass("promote-16bit", {"target-cos": "0.99999", "budget": "1"}).run(promoted_module, ctx)
    assert result.stats["weights-16bit"] == sum(promoted_module.annotations.get(w, {}).get("weight_bits") == 16
                                                for w in ("w1", "w2", "w3")) > 0
    assert result.stats["weight-bytes-16bit"] == sum(int(np.prod(SHAPES[w])) for w in ("w1", "w2", "w3")
                                                     if promoted_module.annotations.get(w, {}).get("weight_bits") == 16)


def test_simulation_with_wider_16_bit_ranges_is_the_lowered_model_bit_for_bit():
    module, _ = calibrated()
    data = samples(2, seed=5)
    wider = {n: activation_encoding(float(e.min[0]) * 2, float(e.max[0]) * 2, 16)
             for n, e in module.encodings.items() if not e.symmetric}
    sim = MixedPrecisionSim(module, QuantConfig(), data, sixteen_bit=wider)
    reference = make_session(sim.float_model)
    for wide in (["c1", "r1"], ["a", "c2"], ["m", "x", "cat"], ["r1", "a", "c1"]):
        simulated = sim.measure({**module.encodings, **{n: wider[n] for n in wide}})
        real_module, _ = lowered(module, wide, sixteen_bit=wider)
        session, stats = make_session(real_module.to_onnx()), ErrorStats()
        for sample in data:
            stats.update(Reference(reference.run(["y"], sample)[0]), session.run(["y"], sample)[0])
        assert (simulated.cos, simulated.error) == (stats.cos, stats.noise / stats.signal), wide


def test_promoted_tensors_take_their_min_max_range_not_the_clipped_one():
    module = from_onnx(model())
    data = samples()
    ctx = PassContext(calib_data=data, log=lambda message: None)
    PassManager(parse_pipeline("calibrate{method=percentile percentile=90},propagate-encodings"), quiet=True).run(module, ctx)
    wide = sixteen_bit_encodings(module, data, fuse_activations=True)
    assert all(e.bw == 16 for e in wide.values())
    clipped, full = module.encodings["c2"], wide["c2"]
    assert float(full.max[0]) > float(clipped.max[0]) and float(full.min[0]) < float(clipped.min[0])
    assert wide["c1"] == wide["r1"] and float(wide["r1"].min[0]) == 0.0  # fused with its Relu, as propagation leaves it
    assert wide["m"] == wide["x"] == wide["cat"]  # Concat shares one encoding


def test_units_follow_readers_and_ties():
    module, _ = calibrated()
    units = {tuple(u) for u in promotion_units(module, set(module.encodings))}
    # c1 is fused with its Relu; a tensor goes with the outputs of its readers; Concat shares one width.
    assert ("c1", "r1") in units
    assert any({"r1", "a", "c1"} <= set(u) for u in units)
    assert all(not ({"m", "x", "cat"} & set(u)) or {"m", "x", "cat"} <= set(u) for u in units)


def test_insert_converts_gives_every_op_its_own_width():
    module, _ = calibrated()
    lowered_module, result = lowered(module, ["a"], constants=False)  # the Add's constant left at 8 bits
    assert result.modified and result.stats["converts"] >= 2 and result.stats["constants"] >= 1
    graph = lowered_module.graph
    for node in graph.nodes:
        width = output_width(node) if node.op not in ("QuantizeLinear", "DequantizeLinear") else None
        if width is None:
            continue
        for tensor in node.inputs:
            dq = tensor.inputs[0] if tensor.inputs else None
            if dq is not None and dq.op == "DequantizeLinear" and dq.inputs[2].values.dtype.kind == "u":
                assert dq.inputs[2].values.dtype.itemsize * 8 == width, (node.name, tensor.name)
    # A biased op whose input was converted reads its bias on the new grid, s_in * s_w.
    for node in (n for n in graph.nodes if n.op == "Conv" and "bit_dq" in n.inputs[0].name):
        input_scale = node.inputs[0].inputs[0].inputs[1].values
        weight_scale = node.inputs[1].inputs[0].inputs[1].values
        bias_scale = node.inputs[2].inputs[0].inputs[1].values
        assert np.array_equal(bias_scale, np.float32(input_scale) * weight_scale.astype(np.float32))
    again = make_pass("insert-converts").run(lowered_module, PassContext(log=lambda message: None))
    assert not again.modified


LAYERNORM = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1,6,8] x) => (float[1,6,8] y) {
  n = LayerNormalization <axis = -1> (x, scale, shift)
  y = Relu(n)
}
"""


def test_a_layernorm_at_16_bits_keeps_its_8_bit_scale():
    """LayerNormalization's scale is stored unsigned like an activation-like constant, but it is a weight: HTP
    refuses a uint16 scale beside the int32 bias (rec's 16-bit LayerNorms were refused on v73)."""
    proto = onnx.parser.parse_model(LAYERNORM)
    rng = np.random.default_rng(3)
    proto.graph.initializer.extend([onnx.numpy_helper.from_array(rng.uniform(0.5, 2, 8).astype(np.float32), "scale"),
                                    onnx.numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "shift")])
    module = from_onnx(infer_shapes(proto))
    ctx = PassContext(calib_data=[{"x": rng.standard_normal((1, 6, 8)).astype(np.float32)} for _ in range(2)],
                      log=lambda message: None)
    PassManager(parse_pipeline("calibrate{method=minmax},propagate-encodings"), quiet=True).run(module, ctx)
    real_module, result = lowered(module, ["n", "y"])
    assert result.stats.get("up") == 1  # x is converted up for the 16-bit LayerNorm
    (layernorm,) = [n for n in real_module.graph.nodes if n.op == "LayerNormalization"]
    assert layernorm.inputs[0].inputs[0].inputs[2].values.dtype == np.uint16
    assert layernorm.inputs[1].inputs[0].inputs[2].values.dtype == np.uint8


@pytest.fixture(scope="module")
def promoted():
    golden = GOLDEN_ROOT / "promote-16bit" / "wide_range_tensor" / "input.onnxtxt"
    module, ctx = calibrated(infer_shapes(onnx.parser.parse_model(golden.read_text())))
    before = module.clone()
    result = make_pass("promote-16bit", {"target-cos": "0.99", "budget": "0.75"}).run(module, ctx)
    return before, module, ctx, result


def test_the_costly_tensor_is_promoted(promoted):
    before, module, _, result = promoted
    assert result.modified
    wide = {n for n, e in module.encodings.items() if e.bw == 16}
    assert {"c", "r"} <= wide and "x" not in wide
    assert all(module.annotations[n]["act_bits"] == 16 for n in wide)
    assert result.stats["cos-before"] < 0.99 <= result.stats["cos-after"]
    # The budget is in bytes: each 16-bit activation's elements once more; converts' bytes beside it.
    activations = [n for n, e in before.encodings.items() if not e.symmetric]
    sizes = {n: int(np.prod(module.graph.tensors()[n].shape)) for n in activations}
    assert result.stats["activation-bytes-8bit"] == sum(sizes.values()) and result.stats["tensors-16bit"] == len(wide)
    assert result.stats["share-16bit"] == sum(sizes[n] for n in wide) / sum(sizes.values()) <= 0.75
    assert result.stats["convert-share"] == (sizes["x"] * 2 / sum(sizes.values()) if result.stats["converts"] else 0)
    record = module.cache["promote-16bit"]
    costly = next(entry for entry in record["promoted"] if "c" in entry["tensors"])
    assert 0 < costly["output_error_share"] <= 1


def test_second_run_changes_nothing(promoted):
    _, module, ctx, _ = promoted
    again = module.clone()
    assert not make_pass("promote-16bit", {"target-cos": "0.99", "budget": "0.75"}).run(again, ctx).modified
    assert again.encodings == module.encodings


def test_budget_is_respected(promoted):
    before, _, ctx, _ = promoted
    module = before.clone()
    ctx.remarks.clear()
    # With 16-bit weights on the promoted layers a quarter of the bytes would reach the target: without them nothing fits.
    result = make_pass("promote-16bit", {"target-cos": "0.99", "budget": "0.25", "wide-weights": "false"}).run(module, ctx)
    assert not result.modified and all(e.bw == 8 for e in module.encodings.values())
    assert any("budget (0.25) holds no more" in r.message for r in ctx.remarks)


def test_needs_calibration_data():
    module, _ = calibrated()
    with pytest.raises(QccError, match="calibration data"):
        make_pass("promote-16bit").run(module, PassContext(log=lambda message: None))


def test_mixed_precision_runs_on_htp(promoted):
    htp = pytest.importorskip("compiler.htp")
    pytest.importorskip("onnxruntime_qnn")
    _, module, _, _ = promoted
    final, _ = lowered(module)
    proto = final.to_onnx()
    # The config's generation (v73): the promoted layers hold 16-bit weights, which v68 refuses.
    outputs, _ = htp.run_htp(proto, samples(1, seed=5), {"htp_arch": "73"})
    simulated = make_session(proto).run(["y"], samples(1, seed=5)[0])[0]
    stats = ErrorStats()
    stats.update(Reference(simulated), outputs[0]["y"])
    assert stats.cos > 0.999


# An SE-like head: HTP reads a Gemm's int32 bias on the s_in * s_w grid whatever the DequantizeLinear says, so a
# converted input needs its bias re-derived (without it: cosine 0.94 / 0.23 against the simulation, measured).
HEAD = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[1,4,8,8] x) => (float[1,8] z) {
  c1 = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
  r1 = Relu(c1)
  p = GlobalAveragePool(r1)
  f = Flatten(p)
  z = Gemm <transB = 1> (f, wg, bg)
}
"""


@pytest.mark.parametrize("wide", [["z"], ["x", "c1", "r1", "p", "f"]], ids=["up-convert", "down-convert"])
def test_converted_ops_agree_on_htp(wide):
    """The converts and re-derived biases mean on HTP what they mean in the CPU simulation."""
    htp = pytest.importorskip("compiler.htp")
    pytest.importorskip("onnxruntime_qnn")
    proto = onnx.parser.parse_model(HEAD)
    rng = np.random.default_rng(0)
    proto.graph.initializer.extend(onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.5, name)
                                   for name, shape in {"w1": [4, 4, 3, 3], "b1": [4], "wg": [8, 4], "bg": [8]}.items())
    module, _ = calibrated(infer_shapes(proto))
    final, result = lowered(module, wide)
    assert result.stats["converts"] == 1 and result.stats["biases"] == 1
    proto = final.to_onnx()
    data = samples(1, seed=5)
    outputs, _ = htp.run_htp(proto, data)
    stats = ErrorStats()
    stats.update(Reference(make_session(proto).run(["z"], data[0])[0]), outputs[0]["z"])
    assert stats.cos > 0.999


def test_from_the_top_it_keeps_at_16_bits_only_what_the_target_needs():
    """When every activation at 16 bits reaches the target, units go back to 8 bits, least damage first, while
    the target holds: the result reaches it, and no kept unit can go back alone without missing it."""
    golden = GOLDEN_ROOT / "promote-16bit" / "wide_range_tensor" / "input.onnxtxt"
    module, ctx = calibrated(infer_shapes(onnx.parser.parse_model(golden.read_text())))
    base = dict(module.encodings)
    result = make_pass("promote-16bit", {"target-cos": "0.99", "budget": "1"}).run(module, ctx)
    assert result.stats["cos-all-16bit"] >= 0.99 <= result.stats["cos-after"]
    wide = {n for n, e in module.encodings.items() if e.bw == 16 and not e.symmetric}
    assert wide and wide != {n for n, e in base.items() if not e.symmetric}  # not everything
    assert result.stats["share-16bit"] < 1


def test_with_held_back_samples_it_ranks_on_calibration_and_chooses_on_the_held_back_ones():
    golden = GOLDEN_ROOT / "promote-16bit" / "wide_range_tensor" / "input.onnxtxt"
    module, ctx = calibrated(infer_shapes(onnx.parser.parse_model(golden.read_text())))
    held = samples(3, seed=7)
    ctx.judge_data = held
    before = module.clone()
    result = make_pass("promote-16bit", {"target-cos": "0.99", "budget": "1"}).run(module, ctx)
    assert result.stats["chosen-on"] == "3 held-back samples"
    # The cosine it reports is the chosen model's on the held-back samples alone, measured here from scratch.
    layers = wide_weight_layers(before, set(before.encodings), QuantConfig())
    check = MixedPrecisionSim(before, QuantConfig(), held, before, wide_weights=frozenset(layers))
    assert result.stats["cos-after"] == pytest.approx(check.measure(module.encodings).cos, abs=1e-6)
    # Every state it measured is a point of the curve, in the report's remarks and the cache.
    curve = module.cache["promote-16bit"]["curve"]
    assert curve == sorted(curve) and len(curve) >= 3 and curve[-1][0] == 1.0
    assert (round(result.stats["share-16bit"], 4), result.stats["cos-after"]) in [tuple(p) for p in curve]
    assert any(r.message.startswith("measured (share of activation bytes at 16 bits -> output cosine): 0.000 -> ")
               for r in ctx.remarks)


def test_short_of_the_target_with_room_for_everything_it_never_ends_below_all_16_bits():
    golden = GOLDEN_ROOT / "promote-16bit" / "wide_range_tensor" / "input.onnxtxt"
    module, ctx = calibrated(infer_shapes(onnx.parser.parse_model(golden.read_text())))
    result = make_pass("promote-16bit", {"target-cos": "1", "budget": "1"}).run(module, ctx)
    assert result.stats["cos-after"] == result.stats["cos-all-16bit"] < 1
    assert result.stats["share-16bit"] == 1
    assert any("even with every activation at 16 bits" in r.message for r in ctx.remarks)


def test_layers_promotes_the_most_sensitive_share_without_a_search(promoted):
    """The LiteMP-style baseline: the units costliest alone go to 16 bits until a quarter of the 4 activations
    (one tensor) is there; the target (unreachable here) is not read, so no remark about it."""
    before, _, ctx, _ = promoted
    module = before.clone()
    ctx.remarks.clear()
    result = make_pass("promote-16bit", {"target-cos": "1", "layers": "0.25"}).run(module, ctx)
    wide = {n for n, e in module.encodings.items() if e.bw == 16}
    assert result.modified and "c" in wide and len(wide) < 4
    assert result.stats["cos-after"] > result.stats["cos-before"]
    assert not any("< 1" in r.message for r in ctx.remarks)
    with pytest.raises(QccError, match="layers must be in"):
        make_pass("promote-16bit", {"layers": "2"}).run(before.clone(), ctx)


def test_the_litemp_style_fill_takes_the_units_that_help_most_alone_while_the_budget_holds():
    from passes.promote_16bit import SettledState
    search = make_pass("promote-16bit", {"budget": "0.5"})
    settled = SettledState({"a": 8, "b": 8, "c": 8, "d": 16}, {"d"}, [["d"]], {("d",): 0.2})
    share_of = lambda encodings: sum(width == 16 for width in encodings.values()) / len(encodings)
    fill, encodings = search._fill([["a"], ["b"], ["c"]], {("a",): 0.1, ("b",): 0.5, ("c",): -0.1}, settled,
                                   {"a": 16, "b": 16, "c": 16}, share_of)
    assert fill == [["b"]]  # then a would put 3 of 4 at 16 bits; c does not help
    assert encodings == {"a": 8, "b": 16, "c": 8, "d": 16}


def test_units_kept_from_the_top_unscreened_say_so(monkeypatch):
    """A unit under TINY_UNIT_SHARE of the bytes is not screened from the top: its share of the error is unknown,
    which the remark and the cache say (not "inf%")."""
    import passes.promote_16bit as promote
    monkeypatch.setattr(promote, "TINY_UNIT_SHARE", 1.0)  # every unit is "tiny": none is screened
    golden = GOLDEN_ROOT / "promote-16bit" / "wide_range_tensor" / "input.onnxtxt"
    module, ctx = calibrated(infer_shapes(onnx.parser.parse_model(golden.read_text())))
    result = make_pass("promote-16bit", {"target-cos": "0.99", "budget": "1"}).run(module, ctx)
    assert result.modified
    reasons = [r.message for r in ctx.remarks if r.message.startswith("to 16 bits")]
    assert reasons and all("kept from the top unscreened (under 100.0% of the activation bytes)" in m for m in reasons)
    assert all(entry["output_error_share"] is None for entry in module.cache["promote-16bit"]["promoted"])


@pytest.mark.parametrize("verdicts", [(False,), (True, False), (True, True)])
def test_short_of_the_target_the_fill_stays_unless_the_search_beats_it_clearly(monkeypatch, verdicts):
    """The search's state replaces the LiteMP-style fill only when judge.beats says it wins by more than the noise
    of the paired per-sample cosines on the samples it chose on, and then again on calibration samples it did not
    see (here with samples=2: the last 2 of 4); otherwise the fill is what is written."""
    import passes.promote_16bit as promote
    calls, answers = [], iter(verdicts)
    monkeypatch.setattr(promote, "beats", lambda searched, filled, min_gain: calls.append((searched, filled)) or next(answers))
    golden = GOLDEN_ROOT / "promote-16bit" / "wide_range_tensor" / "input.onnxtxt"
    module, ctx = calibrated(infer_shapes(onnx.parser.parse_model(golden.read_text())))
    before = module.clone()
    result = make_pass("promote-16bit", {"target-cos": "1", "budget": "0.5", "samples": "2"}).run(module, ctx)
    assert [len(searched) for searched, _ in calls] == [2, 2][:len(verdicts)]  # per sample (one output), paired
    search_kept = all(verdicts)
    judged_search, judged_fill = calls[0]
    assert result.stats["cos-after"] == pytest.approx(float(np.mean(judged_search if search_kept else judged_fill)))
    if len(calls) == 2:  # the second verdict: on calibration samples 2 and 3, which the search never ran
        layers = wide_weight_layers(before, set(before.encodings), QuantConfig())
        check = MixedPrecisionSim(before, QuantConfig(), ctx.calib_data[2:], before, wide_weights=frozenset(layers))
        unseen_search, unseen_fill = calls[1]
        assert float(np.mean(unseen_search if search_kept else unseen_fill)) == pytest.approx(check.measure(module.encodings).cos)
    assert result.stats["share-16bit"] <= 0.5
