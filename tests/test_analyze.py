"""qcc analyze: a broken layer is found and blamed right, the gate's exit codes, and the JSON/HTML agree.

QDQ models come from onnxruntime's quantize_static (a QDQ producer qcc did not write, which also
drops Relus into the quantizer's range) on a small four-conv network.
"""
import json
import logging
import math
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compiler.analyze_cmd import COLUMNS
from compiler.cli import main
from compiler.layer_analysis import analyze, map_qdq

quantization = pytest.importorskip("onnxruntime.quantization")
logging.getLogger().setLevel(logging.ERROR)  # quantize_static warns about pre-processing on every call

CHANNELS = 8
BROKEN = "r2"  # the second conv's output (after its Relu, which onnxruntime folds into the quantizer)


def conv_net(weight_outlier: bool = False) -> onnx.ModelProto:
    """x -> 4 x (3x3 Conv [+ Relu]) -> c4. Output channel 0 of conv1 is dead (bias -100, then Relu)."""
    rng = np.random.default_rng(0)
    inits, nodes, x = [], [], "x"
    for i in range(1, 5):
        w = (rng.standard_normal((CHANNELS, CHANNELS, 3, 3)) / np.sqrt(CHANNELS * 9)).astype(np.float32)
        b = (rng.standard_normal(CHANNELS) * 0.1).astype(np.float32)
        if i == 1:
            b[0] = -100.0
        if i == 2 and weight_outlier:
            # Reads the dead channel, so the float model is unchanged; a per-tensor scale 50 / 127
            # rounds every other weight of the layer to zero.
            w[3, 0, 1, 1] = 50.0
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes.append(helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]))
        if i < 4:
            nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"))
            x = f"r{i}"
    shape = [1, CHANNELS, 16, 16]
    graph = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("c4", TensorProto.FLOAT, shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def samples(count: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, CHANNELS, 16, 16)).astype(np.float32)} for _ in range(count)]


class _Reader(quantization.CalibrationDataReader):
    def __init__(self, data):
        self.data = iter(data)

    def get_next(self):
        return next(self.data, None)


def ort_qdq(float_model, folder, name, overrides=None, activation_type=None):
    """W8A8 (per-tensor weights) QDQ model from onnxruntime's quantize_static."""
    src, dst = folder / f"{name}.float.onnx", folder / f"{name}.qdq.onnx"
    onnx.save(float_model, src)
    quantization.quantize_static(
        str(src), str(dst), _Reader(samples(4, seed=1)), quant_format=quantization.QuantFormat.QDQ, per_channel=False,
        activation_type=activation_type or quantization.QuantType.QUInt8, weight_type=quantization.QuantType.QInt8,
        extra_options={"TensorQuantOverrides": overrides or {}})
    return src, dst


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("analyze")
    blown = {BROKEN: [{"rmin": np.array(0.0, np.float32), "rmax": np.array(1000.0, np.float32)}]}
    data = folder / "data"
    data.mkdir()
    for i, sample in enumerate(samples(3, seed=7)):
        np.save(data / f"{i:02d}.npy", sample["x"])
    return {"clean": ort_qdq(conv_net(), folder, "clean"),
            "weights": ort_qdq(conv_net(weight_outlier=True), folder, "outlier"),
            "activations": ort_qdq(conv_net(), folder, "blown", overrides=blown),
            "data": data, "folder": folder}


def run(models, case):
    src, dst = models[case]
    return analyze(onnx.load(src), onnx.load(dst), samples(2, seed=5))


def test_mapping_finds_the_float_tensors_behind_onnxruntime_names(models):
    src, dst = models["clean"]
    quant = onnx.load(dst)
    mapping = map_qdq(onnx.load(src), quant)
    assert "Relu" not in {n.op_type for n in quant.graph.node}  # folded into the quantizers' ranges
    assert [t.name for t in mapping.activations] == ["x", "r1", "r2", "r3", "c4"]
    assert mapping.unmatched == []
    assert sorted({w.float_name for w in mapping.weights}) == sorted(f"{k}{i}" for k in "wb" for i in range(1, 5))


def test_mapping_survives_renamed_tensors(models):
    """Another producer's naming: every QUANT tensor renamed; nodes keep their names."""
    src, dst = models["clean"]
    quant = onnx.load(dst)
    keep = {i.name for i in quant.graph.input} | {o.name for o in quant.graph.output}
    rename = lambda name: name if not name or name in keep else f"t{abs(hash(name)) % 10**8}"
    for node in quant.graph.node:
        node.input[:] = [rename(n) for n in node.input]
        node.output[:] = [rename(n) for n in node.output]
    for init in quant.graph.initializer:
        init.name = rename(init.name)
    mapping = map_qdq(onnx.load(src), quant)
    assert [t.name for t in mapping.activations] == ["x", "r1", "r2", "r3", "c4"]
    assert len(mapping.weights) == 8 and mapping.unmatched == []
    result = analyze(onnx.load(src), quant, samples(1, seed=5))
    assert all(r.local_cos > 0.999 for r in result.layers)


def test_float_weights_that_are_not_the_quantized_ones_get_no_blame(models):
    """FLOAT must be the model QUANT was quantized from; a rewritten weight (here scaled) is reported, not blamed."""
    src, dst = models["clean"]
    rewritten = onnx.load(src)
    w2 = next(t for t in rewritten.graph.initializer if t.name == "w2")
    w2.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w2) * 2, "w2"))
    result = analyze(rewritten, onnx.load(dst), samples(1, seed=5))
    assert any("not a quantization of the float 'w2'" in note for note in result.unmatched)
    blames = {r.name: r.blame for r in result.layers}
    assert blames["r2"] == "unknown" and blames["r1"] != "unknown"
    assert result.outputs[0].weights_only_cos is None and result.outputs[0].activations_only_cos is None


def test_biases_moved_or_added_by_the_quantizer_still_match(models):
    """Bias correction moves int32 biases on purpose and may give a bias to a conv without one."""
    src, dst = models["clean"]
    quant, float_model = onnx.load(dst), onnx.load(src)
    moved = next(t for t in quant.graph.initializer if t.name.startswith("b2") and t.data_type == TensorProto.INT32)
    moved.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(moved) + 1000, moved.name))
    conv3 = next(n for n in float_model.graph.node if n.name == "conv3")
    del conv3.input[2]  # FLOAT's conv3 has no bias; QUANT's has one
    result = analyze(float_model, quant, samples(1, seed=5))
    assert result.unmatched == []
    assert all(r.blame != "unknown" for r in result.layers)
    assert result.outputs[0].weights_only_cos is not None


def test_biases_stay_float_in_the_weights_only_measure(models):
    """A bias the quantizer moved (the int32 one of a Conv, or paddle's MatMul + Add constant) is matched, and
    "weights only" keeps FLOAT's bias: moving QUANT's changes the full model, not that measure."""
    rng = np.random.default_rng(3)
    w = numpy_helper.from_array((rng.standard_normal((8, 4)) * 0.5).astype(np.float32), "w")
    b = numpy_helper.from_array((rng.standard_normal(4) * 0.5).astype(np.float32), "b")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["m"], name="fc"),
                               helper.make_node("Add", ["m", "b"], ["y"], name="fc_bias")],
                              "fc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [w, b])
    float_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    data = [{"x": rng.standard_normal((2, 8)).astype(np.float32)} for _ in range(4)]
    src, dst = models["folder"] / "fc.float.onnx", models["folder"] / "fc.qdq.onnx"
    onnx.save(float_model, src)
    quantization.quantize_static(str(src), str(dst), _Reader(data), quant_format=quantization.QuantFormat.QDQ)
    quant = onnx.load(dst)
    (add,) = [n for n in quant.graph.node if n.op_type == "Add"]
    bias_dq = next(n for n in quant.graph.node if n.output[0] in add.input and n.op_type == "DequantizeLinear"
                   and any(t.name == n.input[0] for t in quant.graph.initializer))
    before = analyze(float_model, quant, data[:2])
    stored = next(t for t in quant.graph.initializer if t.name == bias_dq.input[0])
    stored.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(stored).astype(np.int32) // 2).astype(
        numpy_helper.to_array(stored).dtype), stored.name))
    after = analyze(float_model, quant, data[:2])
    assert after.unmatched == [] and after.outputs[0].weights_only_cos is not None
    assert after.outputs[0].cos < before.outputs[0].cos  # the moved bias is in the full model
    assert after.outputs[0].weights_only_cos == before.outputs[0].weights_only_cos


def test_tensor_fused_into_its_relu_is_compared_after_it():
    """qcc's insert-qdq keeps the Relu and quantizes the conv output with the Relu's range (propagate-encodings):
    on HTP the two are one op, so the conv output is not a layer of its own."""
    from compiler.ir import from_onnx, infer_shapes
    from compiler.pass_manager import PassContext, PassManager, parse_pipeline
    float_model = conv_net()
    module = from_onnx(infer_shapes(float_model))
    ctx = PassContext(calib_data=samples(4, seed=1), log=lambda message: None)
    PassManager(parse_pipeline("calibrate{method=minmax},propagate-encodings,insert-qdq"), quiet=True).run(module, ctx)
    result = analyze(float_model, module.to_onnx(), samples(2, seed=1))
    assert [r.name for r in result.layers] == ["x", "r1", "r2", "r3", "c4"]
    assert result.fused == [{"tensor": f"c{i}", "into": f"r{i}"} for i in (1, 2, 3)]
    assert result.unmatched == [] and all(r.local_cos > 0.999 for r in result.layers)


def test_tensor_read_by_a_saturating_activation_is_compared_after_it():
    """propagate-encodings clamps a HardSwish input to [-3, max] (below -3 the output is 0 anyway): the clamped
    values are no error."""
    from compiler.ir import from_onnx, infer_shapes
    from compiler.pass_manager import PassContext, PassManager, parse_pipeline
    float_model = conv_net()
    float_model.opset_import[0].version = 14
    relu2 = next(n for n in float_model.graph.node if n.name == "relu2")
    relu2.op_type = "HardSwish"
    bias2 = next(t for t in float_model.graph.initializer if t.name == "b2")
    bias2.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias2) - 4, "b2"))  # most of c2 below -3
    float_model = infer_shapes(float_model)
    module = from_onnx(float_model)
    ctx = PassContext(calib_data=samples(4, seed=1), log=lambda message: None)
    PassManager(parse_pipeline("calibrate{method=minmax},propagate-encodings,insert-qdq"), quiet=True).run(module, ctx)
    assert module.encodings["c2"].min[0] >= -3.1  # clamped
    result = analyze(float_model, module.to_onnx(), samples(2, seed=1))
    row = next(r for r in result.layers if r.name == "c2")
    assert row.then == "HardSwish" and row.local_cos > 0.999


def test_clean_model_has_no_bad_layer(models):
    result = run(models, "clean")
    assert all(r.local_cos > 0.999 for r in result.layers)
    assert result.outputs[0].cos > 0.999


def test_weight_outlier_ranked_first_and_blamed_on_weights(models):
    result = run(models, "weights")
    worst = result.worst(3)
    assert worst[0].name == BROKEN
    assert worst[0].blame == "weights"
    assert worst[0].local_sqnr < 10 < worst[1].local_sqnr
    # The damage propagates (accumulated error downstream) but the later layers are fine on their own.
    downstream = [r for r in result.layers if r.name in ("r3", "c4")]
    assert all(r.sqnr < 10 and r.local_sqnr > 25 for r in downstream)
    assert result.outputs[0].weights_only_cos < 0.9 < result.outputs[0].activations_only_cos


def test_activation_range_blowup_ranked_first_and_blamed_on_activations(models):
    result = run(models, "activations")
    worst = result.worst(3)
    assert worst[0].name == BROKEN
    assert worst[0].blame == "activations"
    assert worst[0].enc_max > 100 > worst[0].fp32_max
    assert result.outputs[0].activations_only_cos < 0.9 < result.outputs[0].weights_only_cos


def test_sixteen_bit_activations_are_read(models):
    src, dst8 = models["clean"]
    _, dst16 = ort_qdq(onnx.load(src), models["folder"], "a16", activation_type=quantization.QuantType.QUInt16)
    calibration = samples(4, seed=1)[:2]  # inside the calibrated ranges: rounding noise only, no clipping
    eight = analyze(onnx.load(src), onnx.load(dst8), calibration)
    sixteen = analyze(onnx.load(src), onnx.load(dst16), calibration)
    assert {r.bits for r in eight.layers} == {8} and {r.bits for r in sixteen.layers} == {16}
    # 8 more bits: about 48 dB less activation noise, tensor by tensor.
    for r8, r16 in zip(eight.layers, sixteen.layers):
        assert r16.activations_sqnr > r8.activations_sqnr + 40, r8.name


def cli(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_fail_under_exit_codes(models, capsys):
    src, dst = models["activations"]
    base = ["analyze", src, dst, "--data", models["data"]]
    code, out, _ = cli(capsys, *base, "--fail-under", "cos=0.1")
    assert code == 0 and "gate passed" in out
    code, _, err = cli(capsys, *base, "--fail-under", "cos=0.999")
    assert code == 1 and "cosine" in err and "< 0.999" in err
    code, _, err = cli(capsys, *base, "--fail-under", "cos=0.1,sqnr=60")
    assert code == 1 and "SQNR" in err
    code, _, err = cli(capsys, *base, "--fail-under", "psnr=3")
    assert code == 2 and err.count("\n") == 1 and "cos=NUMBER" in err
    code, _, err = cli(capsys, "analyze", src, dst, "--data", models["folder"] / "missing")
    assert code == 2 and "no such folder" in err


def test_terminal_table_lists_the_worst_layers_first(models, capsys):
    src, dst = models["weights"]
    code, out, _ = cli(capsys, "analyze", src, dst, "--data", models["data"], "--top", "2")
    assert code == 0
    table = out.split("blame\n", 1)[1].splitlines()
    first = table[0].split()
    assert first[0] == "1" and first[2] == BROKEN and first[-1] == "weights"
    assert table[1].split()[0] == "2" and table[2:3] in ([], [""])


class _Tables(HTMLParser):
    """Cell texts of every <table id=...>, by id: {id: [[cell, ...], ...]} (body rows only)."""

    def __init__(self):
        super().__init__()
        self.tables, self.current, self.row, self.cell, self.in_body = {}, None, None, None, False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.current = self.tables.setdefault(attrs.get("id"), [])
        elif tag == "tbody":
            self.in_body = True
        elif tag == "tr" and self.in_body:
            self.row = []
        elif tag == "td" and self.row is not None:
            self.cell = ""

    def handle_endtag(self, tag):
        if tag == "td" and self.cell is not None:
            self.row.append(self.cell)
            self.cell = None
        elif tag == "tr" and self.row is not None:
            self.current.append(self.row)
            self.row = None
        elif tag == "tbody":
            self.in_body = False

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data


def _agrees(cell: str, value) -> bool:
    if value is None:
        return cell in ("-", "inf", "?")
    if isinstance(value, bool) or isinstance(value, str):
        return cell == str(value)
    # Equal up to the digits printed: half a unit of the last printed decimal (or 6 significant digits).
    decimals = len(cell.split(".")[1]) if "." in cell and "e" not in cell else 0
    return math.isclose(float(cell), value, rel_tol=1e-5, abs_tol=0.51 * 10.0 ** -decimals)


@pytest.fixture(scope="module")
def report(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    src, dst = models["weights"]
    assert main(["analyze", str(src), str(dst), "--data", str(models["data"]), "--top", "3",
                 "--json", str(out / "r.json"), "--html", str(out / "r.html")]) == 0
    return json.loads((out / "r.json").read_text()), out / "r.html"


def test_html_table_matches_json(report):
    data, page = report
    parser = _Tables()
    parser.feed(page.read_text())
    keys = [key for key, _, _ in COLUMNS]
    layers = parser.tables["layers"]
    assert len(layers) == len(data["layers"]) == 5
    for row, expected in zip(layers, data["layers"]):
        assert len(row) == len(keys)
        for key, cell in zip(keys, row):
            assert _agrees(cell, expected[key]), (expected["name"], key, cell, expected[key])
    assert [row[keys.index("name")] for row in parser.tables["worst"]] == data["worst"]
    assert data["worst"][0] == BROKEN
    assert "http://" not in page.read_text().replace('xmlns="http://www.w3.org/2000/svg"', "")


BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def test_html_renders_in_headless_chromium(report, tmp_path):
    from PIL import Image
    browser = next((b for b in BROWSERS if shutil.which(b)), None)
    if browser is None:
        pytest.skip("no headless browser installed (CI: apt-get install -y chromium)")
    _, page = report
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,900",
                    page.as_uri()], capture_output=True, timeout=120, check=False)
    assert shot.exists(), "the browser wrote no screenshot"
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (900, 1200)
    ink = (pixels.sum(axis=2) < 600).mean()
    assert 0.01 < ink < 0.9  # text, lines and tables drawn on a white page
    orange = (abs(pixels - np.array([0xFF, 0x7F, 0x0E])).sum(axis=2) < 60).sum()
    assert orange > 50  # the local-SQNR curve of the inline SVG plot


def test_real_classifier(assets, tmp_path):
    from compiler.ir import load
    from compiler.pass_manager import PassManager, parse_pipeline
    module = load(assets / "models" / "ppocr_cls.onnx", {"x": [1, 3, 48, 192]})
    PassManager(parse_pipeline("fold-constants,cleanup,upgrade-opset{version=13}"), quiet=True).run(module)
    float_model = module.to_onnx()
    rng = np.random.default_rng(0)
    data = [{"x": rng.uniform(-1, 1, (1, 3, 48, 192)).astype(np.float32)} for _ in range(2)]
    src, dst = tmp_path / "cls.onnx", tmp_path / "cls.qdq.onnx"
    onnx.save(float_model, src)
    quantization.quantize_static(str(src), str(dst), _Reader(data), quant_format=quantization.QuantFormat.QDQ,
                                 per_channel=True)
    result = analyze(float_model, onnx.load(dst), data)
    quant = onnx.load(dst)
    quantized = {n.input[0] for n in quant.graph.node if n.op_type == "QuantizeLinear"}
    assert result.unmatched == []
    assert len(result.layers) == len(quantized)
    assert result.outputs[0].cos > 0.95
    assert all(r.local_cos > 0.95 for r in result.layers)
