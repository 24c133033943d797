"""qcc encodings check: every rule caught by a file that breaks it, and silence for the files qcc writes."""
import json

import numpy as np
import onnx
import onnx.parser
import pytest

from compiler.cli import main
from compiler.encoding import qdq_params
from compiler.export import read_encodings

CLIP_MODEL = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[1,3,8,8] x) => (float[1,4,8,8] y) <float[4,3,1,1] w = {1,0,0, 0,1,0, 0,0,1, 1,1,1}, float lo = {0.0}, float hi = {6.0}> {
  c = Conv(x, w)
  y = Clip(c, lo, hi)
}
"""


def compile_htp(work, *extra):
    assert main(["compile", str(work / "m.onnx"), "-o", str(work / "run" / "m.onnx"), "--target", "htp", "-q",
                 "--no-htp-check", "--calib-data", str(work / "data"), *extra]) == 0


def check(work, capsys, *extra) -> tuple[int, list[str]]:
    code = main(["encodings", "check", str(work / "run" / "m.onnx"), str(work / "run" / "m.encodings"), *extra])
    prefix = f"{work / 'run' / 'm.encodings'}: "
    lines = [line for line in capsys.readouterr().out.splitlines() if line]
    assert all(line.startswith(prefix) for line in lines)  # each line names the file
    return code, [line[len(prefix):] for line in lines]


def edit(work, change):
    path = work / "run" / "m.encodings"
    document = json.loads(path.read_text())
    sections = [key for key in ("activation_encodings", "param_encodings", "encodings") if key in document]
    change({entry["name"]: entry for section in sections for entry in document[section]}, document)
    path.write_text(json.dumps(document))


@pytest.mark.parametrize("fmt", ["1.0.0", "2.0.0", "0.6.1"])
def test_the_files_qcc_writes_describe_their_model(work, capsys, fmt):
    compile_htp(work, "--encodings-format", fmt)
    assert check(work, capsys) == (0, [])


@pytest.mark.parametrize("fmt", ["1.0.0", "2.0.0"])
def test_a_quantized_tensor_without_an_encoding(work, capsys, fmt):
    compile_htp(work, "--encodings-format", fmt)
    edit(work, lambda entries, doc: doc["activation_encodings" if fmt == "1.0.0" else "encodings"].remove(entries["x"]))
    assert check(work, capsys) == (1, ["activation 'x' is quantized in the model but has no encoding"])


def test_a_name_the_model_does_not_have(work, capsys):
    compile_htp(work)
    edit(work, lambda entries, doc: doc["activation_encodings"].append({**entries["y"], "name": "linear_1.tmp_0"}))
    assert check(work, capsys) == (1, ["'linear_1.tmp_0' names no tensor of the model"])


def test_a_tensor_qualcomms_tools_fuse_away(work, capsys):
    compile_htp(work)
    # Conv + Relu is one op for the converter and AIMET: the Conv's output 'c' has no quantizer there.
    edit(work, lambda entries, doc: doc["activation_encodings"].append({**entries["y"], "name": "c"}))
    code, lines = check(work, capsys)
    assert code == 1 and lines == ["'c' is the output of Conv, which Qualcomm's tools fuse with the Relu after it: "
                                   "Qualcomm's tools have no quantizer for it"]


def test_a_2_0_0_zero_point_the_model_does_not_use(work, capsys):
    compile_htp(work, "--encodings-format", "2.0.0")

    def shift(entries, doc):
        entries["x"]["y_zero_point"] += 1
        entries["w"]["y_zero_point"] = [1] * len(entries["w"]["y_scale"])  # a signed weight whose zero point is not 0
    edit(work, shift)
    code, lines = check(work, capsys)
    assert code == 1 and len(lines) == 2
    assert lines[0].startswith("parameter 'w': offset") and lines[1].startswith("activation 'x': offset")


def test_an_offset_or_scale_the_model_does_not_use(work, capsys):
    compile_htp(work)

    def shift(entries, doc):
        entries["x"]["offset"] = [entries["x"]["offset"][0] - 1]
        entries["y"]["scale"] = [entries["y"]["scale"][0] * 1.01]
    edit(work, shift)
    code, lines = check(work, capsys)
    assert code == 1 and len(lines) == 2
    assert lines[0].startswith("activation 'x': offset") and "in the file" in lines[0]
    assert lines[1].startswith("activation 'y': scale")


def test_a_bias_off_its_input_and_weight_scales(work, capsys):
    compile_htp(work)

    def rescale(entries, doc):
        bias, weight, source = entries["b"], entries["w"], entries["x"]
        bias["scale"] = [source["scale"][0] * s * 2 for s in weight["scale"]]
    edit(work, rescale)
    code, lines = check(work, capsys)
    assert code == 1
    assert any(line.startswith("bias 'b' of node") and "as s_in * s_w" in line for line in lines)


def test_a_weight_wider_than_the_generation_takes(work, capsys):
    compile_htp(work, "--act-bits", "16", "--weight-bits", "16")
    assert check(work, capsys) == (0, [])  # compiled for v73, which takes 16-bit weights
    code, lines = check(work, capsys, "--htp-arch", "68")
    assert code == 1 and lines == ["parameter 'w': 16-bit weight; HTP v68 takes 4 or 8-bit weights (16 needs v73 or later)"]


def test_clip_bounds_are_covered_with_their_values(work, capsys):
    onnx.save(onnx.parser.parse_model(CLIP_MODEL), work / "m.onnx")
    compile_htp(work)
    assert check(work, capsys) == (0, [])
    params = read_encodings(work / "run" / "m.encodings")[1]
    for name, value in (("lo", 0.0), ("hi", 6.0)):  # AIMET quantizes Clip's bounds: the file holds them exactly
        scale, zero_point = qdq_params(params[name])
        assert (np.round(np.float32(value) / scale) - zero_point) * scale == pytest.approx(value, rel=1e-6, abs=0)
    edit(work, lambda entries, doc: doc["param_encodings"].remove(entries["hi"]))
    assert check(work, capsys) == (1, ["parameter 'hi' is quantized in the model but has no encoding"])


def test_a_sign_the_model_does_not_use(work, capsys):
    compile_htp(work)
    edit(work, lambda entries, doc: entries["w"].update(is_sym=False))
    assert check(work, capsys) == (1, ["parameter 'w': is_sym False in the file, True in the model"])
