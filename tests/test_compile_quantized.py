"""qcc compile for quantized targets: data flags, target defaults and overrides, the three outputs."""
import json

import numpy as np
import onnx
import onnx.parser
import pytest

from compiler import targets
from compiler.cli import main
from compiler.ir import QccError
from compiler.targets import TARGETS

MODEL_TEXT = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[1,3,8,8] x) => (float[1,4] y)
  <float[4,3,3,3] w = {0.1, -0.2, 0.3, 0.4, -0.5, 0.6, 0.7, -0.8, 0.9, 1.0, -1.1, 1.2, 0.13, -0.14, 0.15, 0.16, -0.17, 0.18,
                       0.5, 0.5, -0.5, 0.25, 0.25, -0.25, 0.1, 0.1, -0.1, 2.0, -2.0, 1.0, 0.0, 0.5, -0.5, 1.5, -1.5, 0.75,
                       -0.3, 0.3, -0.3, 0.3, 0.0, 0.0, 0.2, -0.2, 0.1, 0.01, 0.02, -0.03, 0.04, 0.05, -0.06, 0.07, 0.08, -0.09,
                       0.1, -0.2, 0.3, 0.4, -0.5, 0.6, 0.7, -0.8, 0.9, 1.0, -1.1, 1.2, 0.13, -0.14, 0.15, 0.16, -0.17, 0.18,
                       0.5, 0.5, -0.5, 0.25, 0.25, -0.25, 0.1, 0.1, -0.1, 2.0, -2.0, 1.0, 0.0, 0.5, -0.5, 1.5, -1.5, 0.75,
                       -0.3, 0.3, -0.3, 0.3, 0.0, 0.0, 0.2, -0.2, 0.1, 0.01, 0.02, -0.03, 0.04, 0.05, -0.06, 0.07, 0.08, -0.09},
   float[4] b = {0.1, -0.1, 0.2, 0.0}, float[4,4] fc = {1.0, 0.5, -0.5, 0.25, 0.1, 0.2, 0.3, 0.4, -1.0, 1.0, -1.0, 1.0, 0.5, 0.5, 0.5, 0.5}> {
  c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
  r = Relu(c)
  p = GlobalAveragePool(r)
  f = Flatten(p)
  g = MatMul(f, fc)
  y = Softmax <axis = 1> (g)
}
"""


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(onnx.parser.parse_model(MODEL_TEXT), path)
    return path


def _samples(folder, count, seed):
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(count):
        np.save(folder / f"{i:03d}.npy", rng.standard_normal((1, 3, 8, 8)).astype(np.float32))
    return folder


@pytest.fixture
def data(tmp_path):
    return _samples(tmp_path / "calib", 6, 0), _samples(tmp_path / "eval", 3, 1)


def run(args, capsys):
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_htp_writes_model_encodings_and_report(model, data, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    code, err = run(["compile", model, "--target", "htp", "--calib-data", data[0], "--eval-data", data[1], "-o", out], capsys)
    assert code == 0, err
    quantized = onnx.load(out)
    assert any(n.op_type == "QuantizeLinear" for n in quantized.graph.node)
    encodings = json.loads((tmp_path / "out.encodings").read_text())
    assert encodings["version"] == "1.0.0" and {e["name"] for e in encodings["param_encodings"]} >= {"w", "b", "fc"}
    report = json.loads((tmp_path / "out.report.json").read_text())
    assert [p["name"] for p in report["passes"]][-3:] == ["bias-correction", "propagate-encodings", "insert-qdq"]
    assert report["calibration_samples"] == 6 and all("seconds" in p for p in report["passes"])
    metrics = report["evaluation"]["y"]
    assert metrics["samples"] == 3 and metrics["cosine_mean"] > 0.99 and metrics["sqnr_db"] > 20
    assert "output y: cosine" in err and "SQNR" in err


def test_w8a16_and_legacy_encodings(model, data, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    code, err = run(["compile", model, "--target", "htp", "--calib-data", data[0], "--act-bits", "16",
                     "--encodings-format", "0.6.1", "--calib-count", "2", "-o", out], capsys)
    assert code == 0, err
    q_types = {n.output[0]: n.domain for n in onnx.load(out).graph.node if n.op_type == "QuantizeLinear"}
    assert q_types and set(q_types.values()) == {"com.microsoft"}
    encodings = json.loads((tmp_path / "out.encodings").read_text())
    assert encodings["version"] == "0.6.1" and encodings["activation_encodings"]["r"][0]["bitwidth"] == 16
    assert json.loads((tmp_path / "out.report.json").read_text())["calibration_samples"] == 2


@pytest.mark.parametrize("extra, message", [
    ([], "needs --calib-data"),
    (["--act-bits", "16", "--calib-data", "CALIB", "--target", "cpu"], "target 'cpu' is not quantized"),
    (["--passes", "calibrate,insert-qdq", "--calib-method", "mse"], "with --passes, give the options in the pipeline"),
    (["--passes", "quant{act-bits=8},calibrate,insert-qdq", "--act-bits", "16", "--calib-data", "CALIB"],
     "both set the config; give it once"),
    (["--calib-count", "3"], "--calib-count needs --calib-data"),
])
def test_mistakes_are_one_line_errors(model, data, tmp_path, capsys, extra, message):
    extra = [data[0] if e == "CALIB" else e for e in extra]
    target = [] if "--target" in extra or "--passes" in extra else ["--target", "htp"]
    code, err = run(["compile", model, *target, *extra, "-o", tmp_path / "out.onnx"], capsys)
    assert code == 2 and message in err and not (tmp_path / "out.onnx").exists()


def test_bad_calibration_file_is_named(model, data, tmp_path, capsys):
    np.save(data[0] / "zz_bad.npy", np.zeros((1, 3, 4, 4), np.float32))
    code, err = run(["compile", model, "--target", "htp", "--calib-data", data[0], "-o", tmp_path / "o.onnx"], capsys)
    assert code == 2 and "zz_bad.npy" in err and "[1, 3, 4, 4]" in err


def test_target_pipelines_are_pipeline_objects_with_one_config(monkeypatch):
    htp = TARGETS["htp"].build()
    text = str(htp)
    assert text.startswith("quant{act-bits=8 weight-bits=8 bias-bits=32 per-channel=true htp-arch=73},fold-constants")
    assert [p.name for p in htp][-2:] == ["propagate-encodings", "insert-qdq"] and "pad-channels" not in text
    assert htp.find("calibrate").options.method == "mse"
    assert not TARGETS["dsp"].build().config.per_channel and not TARGETS["hta"].build().config.per_channel
    wide = TARGETS["htp"].build(act_bits=16)
    assert wide.config.act_bits == 16 and wide.find("calibrate").options.method == "minmax"
    # No AdaRound by default (docs/measurements.md): bias correction at both widths, through the quantized
    # model's layer inputs at 8 bits.
    assert htp.find("adaround") is None and wide.find("adaround") is None
    assert (htp.find("bias-correction").options.mode, htp.find("bias-correction").options.samples) == ("sequential", 4)
    assert (wide.find("bias-correction").options.mode, wide.find("bias-correction").options.samples) == ("empirical", 8)
    everything = TARGETS["htp"].build(left_out=frozenset())
    names = [p.name for p in everything]
    assert names[names.index("cle"):names.index("propagate-encodings")] == [
        "cle", "calibrate", "adaround", "brecq", "bias-correction"]
    adaround = everything.find("adaround").options
    assert (adaround.iterations, adaround.samples) == (200, 8)
    with pytest.raises(QccError, match="cannot leave out fold-bn"):
        TARGETS["htp"].build(left_out=frozenset({"fold-bn"}))
    custom = TARGETS["htp"].build(act_bits=16, weight_bits=4, calib_method="mse")
    assert (custom.config.act_bits, custom.config.weight_bits, custom.find("calibrate").options.method) == (16, 4, "mse")
    assert [p.name for p in TARGETS["cpu"].build()] == ["fold-constants", "cleanup", "upgrade-opset"]
    # A name in a target's pipeline that is not a registered pass is an error, never dropped.
    monkeypatch.setattr(targets, "FLOAT_REWRITES", ("fold-bn", "no-such-pass"))
    with pytest.raises(QccError, match="unknown pass 'no-such-pass'"):
        TARGETS["htp"].build()
