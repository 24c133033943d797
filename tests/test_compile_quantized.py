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
    (["--passes", "calibrate,insert-qdq", "--act-bits", "16"], "with --passes, give the options in the pipeline"),
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


def test_target_pipelines_come_from_registered_passes(monkeypatch):
    htp = TARGETS["htp"].pipeline_text()
    assert htp.startswith("fold-constants,cleanup,upgrade-opset{version=14}")
    assert "insert-qdq{act-bits=8 weight-bits=8 per-channel=true}" in htp and "pad-channels" not in htp
    assert "calibrate{method=mse act-bits=8}" in htp
    assert "per-channel=false" in TARGETS["dsp"].pipeline_text() and "per-channel=false" in TARGETS["hta"].pipeline_text()
    assert "calibrate{method=minmax act-bits=16}" in TARGETS["htp"].pipeline_text(act_bits=16)
    # No AdaRound by default (measured in compiler/targets.py): bias correction at both widths, through the
    # quantized model's layer inputs at 8 bits.
    for text in (htp, TARGETS["htp"].pipeline_text(act_bits=16)):
        assert "adaround" not in text
    assert "bias-correction{samples=4 mode=sequential" in htp
    assert "bias-correction{samples=8 weight-bits=8" in TARGETS["htp"].pipeline_text(act_bits=16)
    assert "cle,calibrate{method=mse act-bits=8},adaround{iterations=200 samples=8" in \
        TARGETS["htp"].pipeline_text(left_out=frozenset())
    with pytest.raises(QccError, match="cannot leave out fold-bn"):
        TARGETS["htp"].pipeline_text(left_out=frozenset({"fold-bn"}))
    custom = TARGETS["htp"].pipeline_text(act_bits=16, weight_bits=4, calib_method="mse")
    assert "calibrate{method=mse act-bits=16}" in custom and "insert-qdq{act-bits=16 weight-bits=4" in custom
    monkeypatch.setattr(targets, "FLOAT_REWRITES", ("fold-bn", "no-such-pass"))
    assert "no-such-pass" not in TARGETS["htp"].pipeline_text()
    assert TARGETS["cpu"].pipeline_text() == TARGETS["cpu"].pipeline
