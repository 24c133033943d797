"""AIMET reads what qcc writes (issue 20): on every fetched model (PP-OCR cls, det, rec and the document
orientation classifier) compiled for HTP at W8A8 and W8A16, in every encodings format, aimet-onnx's
QuantizationSimModel on OUT.float.onnx (HTP v73 config) takes OUT.encodings and simulates what OUT.onnx
computes, and ``encodings_to_onnx_qdq`` rebuilds OUT.onnx from the two files.

Strict loading holds for every encoding but the int32 biases: AIMET's HTP configs disable bias quantizers
(``"bias": {"is_quantized": "False"}``), so its loader reports each bias encoding as an enabled mismatch, and
AIMET's own ``sim.export(export_int32_bias=True)`` does not reload strictly either (docs/encodings.md); in
0.6.1 also a per-channel weight of one channel (the format cannot tell it from per tensor). At W8A8 the
simulation parts from OUT.onnx where AIMET rounds a tie away from zero and QuantizeLinear to even (a test
below shows both rules), or where float32 rounding puts a value on the other side of a half step. Skipped
when aimet-onnx (``pip install .[aimet]``) is not installed.
"""
import json
import os

import numpy as np
import onnxruntime as ort
import pytest

from compiler.cli import main
from compiler.runtime import make_session

aimet_onnx = pytest.importorskip("aimet_onnx")
quantsim = pytest.importorskip("aimet_onnx.quantsim")
onnx = pytest.importorskip("onnx")

FORMATS = ("1.0.0", "2.0.0", "0.6.1")
WIDTHS = {"W8A8": ("8", "int8"), "W8A16": ("16", "int16")}
SIM_COSINE = 0.999
REBUILT_COSINE = 0.9999


# model -> (file, image folder, input shape, mean, std, calibration images, the int32 biases (every Conv, Gemm
# and LayerNormalization))
MODELS = {
    "cls": ("ppocr_cls.onnx", "text_cls", [1, 3, 48, 192], (0.5,) * 3, (0.5,) * 3, 16, 54),
    "orient": ("doc_orientation.onnx", "text_det", [1, 3, 224, 224], (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 8, 33),
    "det": ("ppocr_det.onnx", "text_det", [1, 3, 320, 320], (0.5,) * 3, (0.5,) * 3, 8, 64),
    "rec": ("ppocr_rec.onnx", "text_cls", [1, 3, 48, 320], (0.5,) * 3, (0.5,) * 3, 16, 52),
}
# At W8A8, AIMET's simulation against OUT.onnx: (median, worst) over 8 images at least. AIMET rounds a tie away
# from zero, QuantizeLinear to even (the last test), and AIMET's arithmetic puts some values within a float32 ulp
# of a half step on the other side (x / s = 113.49999: QuantizeLinear 113, AIMET 114). Each such step grows
# layer by layer on an image the 8-bit model is unsure of (cls: 1 value in a 25k tensor, 26k values differ 20
# layers on); OUT.float.onnx holds the int32 biases' values, or AIMET's float biases add many more (det's
# median was 0.9974). Measured 2026-12-04: cls seven of 8 >= 0.99996, one 0.989; orient >= 0.99985; det
# 0.9978-0.9991; rec 0.9948-0.9993.
TIE_ROUNDING_BOUNDS = {"cls": (0.999, 0.98), "orient": (0.999, 0.999), "det": (0.998, 0.997), "rec": (0.998, 0.99)}
# AIMET's 8-bit median against OUT.onnx may fall this far below onnxruntime's own optimized run's against it
# (measured 2026-12-04 on 8 images: det AIMET 0.9988, onnxruntime 0.99927 (worst 0.99861); rec 0.9987 and
# 0.99841 (worst 0.975)).
SELF_AGREEMENT_MARGIN = 0.001
# 0.6.1 lists one entry per channel, so a per-channel weight of one output channel (det's last ConvTranspose)
# reads as per tensor where AIMET keeps a per-channel quantizer: its strict load reports that one tensor.
SINGLE_CHANNEL_WEIGHTS = {"det": {"conv2d_transpose_1.w_0"}}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
    return request.param


@pytest.fixture(scope="module")
def compiled(assets, tmp_path_factory, model):
    """{(width, format): OUT path prefix} of ``model`` compiled for HTP, for every width and format."""
    file, folder, shape, mean, std, count, _ = MODELS[model]
    work = tmp_path_factory.mktemp(f"aimet-{model}")
    prefixes = {}
    for width, (act_bits, _) in WIDTHS.items():
        for fmt in FORMATS:
            out = work / f"{model}-{width}-{fmt.replace('.', '_')}.onnx"
            assert main(["compile", str(assets / "models" / file), "-o", str(out), "--target", "htp", "-q",
                         "--no-htp-check", "--calib-data", str(assets / folder), "--calib-count", str(count),
                         "--input-shape", "x:" + ",".join(map(str, shape)),
                         "--image-mean", ",".join(map(str, mean)), "--image-std", ",".join(map(str, std)),
                         "--act-bits", act_bits, "--encodings-format", fmt]) == 0
            prefixes[width, fmt] = str(out.with_suffix(""))
    return prefixes


@pytest.fixture(scope="module")
def images(assets, model):
    from compiler.data import Dataset, ImageOptions, specs_of
    from compiler.ir import load
    file, folder, shape, mean, std, count, _ = MODELS[model]
    module = load(assets / "models" / file, {"x": shape})
    samples = Dataset(assets / folder, specs_of(module), count=count + 8, image=ImageOptions(mean=mean, std=std))
    return [samples[i]["x"] for i in range(count, count + 8)]


def _sim(prefix: str, activation_type: str):
    config = os.path.join(os.path.dirname(aimet_onnx.__file__), "common", "quantsim_config", "htp_quantsim_config_v73.json")
    return quantsim.QuantizationSimModel(onnx.load(prefix + ".float.onnx"), param_type="int8",
                                         activation_type=activation_type, config_file=config)


def _entries(document: dict) -> list:
    if document["version"] == "2.0.0":
        return document["encodings"]
    if document["version"] == "1.0.0":
        return [*document["activation_encodings"], *document["param_encodings"]]
    return [{"name": name, **channels[0]} for section in ("activation_encodings", "param_encodings")
            for name, channels in document[section].items()]


def _bias_names(document: dict) -> set:
    return {e["name"] for e in _entries(document) if e.get("bw", e.get("bitwidth")) == 32 or e.get("output_dtype") == "int32"}


def _without(document: dict, names: set) -> dict:
    if document["version"] == "2.0.0":
        return {**document, "encodings": [e for e in document["encodings"] if e["name"] not in names]}
    if document["version"] == "1.0.0":
        return {**document, "param_encodings": [e for e in document["param_encodings"] if e["name"] not in names]}
    return {**document, "param_encodings": {n: e for n, e in document["param_encodings"].items() if n not in names}}


def _cosines(reference, candidate, images) -> list:
    name = reference.get_inputs()[0].name
    result = []
    for image in images:
        a, b = (np.asarray(s.run(None, {name: image})[0], dtype=np.float64).ravel() for s in (reference, candidate))
        result.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
    return result


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("width", WIDTHS)
def test_aimet_loads_the_file_strictly_but_for_int32_biases(compiled, model, width, fmt):
    prefix = compiled[width, fmt]
    document = json.loads(open(prefix + ".encodings").read())
    biases = _bias_names(document)
    assert len(biases) == MODELS[model][-1]  # every Conv and Gemm (cls: fc_0.b_0 included)
    sim = _sim(prefix, WIDTHS[width][1])
    enabled = {name for name, quantizer in sim.qc_quantize_op_dict.items() if quantizer and quantizer.enabled}
    assert {e["name"] for e in _entries(document)} - biases == enabled  # the file's quantizers are AIMET's, one for one
    single = SINGLE_CHANNEL_WEIGHTS.get(model, set()) if fmt == "0.6.1" else set()
    if not single:
        quantsim.load_encodings_to_sim(sim, _without(document, biases), strict=True)
    mismatches = quantsim.load_encodings_to_sim(_sim(prefix, WIDTHS[width][1]), document, strict=False)
    assert {m.quantizer_name for m in mismatches} == biases | single
    assert all(m.enabled_mismatch == (False, True) for m in mismatches if m.quantizer_name in biases)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("width", WIDTHS)
def test_aimet_simulates_and_rebuilds_what_the_qdq_model_computes(compiled, images, model, width, fmt):
    prefix = compiled[width, fmt]
    ours = make_session(onnx.load(prefix + ".onnx"))
    sim = _sim(prefix, WIDTHS[width][1])
    quantsim.load_encodings_to_sim(sim, prefix + ".encodings", strict=False)
    agreement = _cosines(ours, sim.session, images)
    if width == "W8A8":
        median, worst = TIE_ROUNDING_BOUNDS[model]
        assert np.median(agreement) >= median and min(agreement) >= worst
    else:
        assert min(agreement) >= SIM_COSINE
    rebuilt = quantsim.encodings_to_onnx_qdq(prefix + ".float.onnx", prefix + ".encodings")
    assert min(_cosines(ours, make_session(rebuilt), images)) >= REBUILT_COSINE


@pytest.mark.parametrize("width", WIDTHS)
def test_at_8_bits_aimet_agrees_with_our_model_as_well_as_onnxruntime_agrees_with_itself(compiled, images, model, width):
    """Why the 8-bit agreement is bounded by TIE_ROUNDING_BOUNDS and not SIM_COSINE: onnxruntime's own optimized
    run of OUT.onnx (its QDQ fusions compute in integers) parts from the unoptimized run by rounding steps that
    grow layer by layer, as AIMET's does (docs/encodings.md); at 16 bits neither parts."""
    prefix = compiled[width, "1.0.0"]
    unoptimized = make_session(onnx.load(prefix + ".onnx"))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    optimized = ort.InferenceSession(prefix + ".onnx", options, providers=["CPUExecutionProvider"])
    itself = _cosines(unoptimized, optimized, images)
    sim = _sim(prefix, WIDTHS[width][1])
    quantsim.load_encodings_to_sim(sim, prefix + ".encodings", strict=False)
    aimet = _cosines(unoptimized, sim.session, images)
    if width == "W8A16":
        assert min(itself) >= REBUILT_COSINE and min(aimet) >= SIM_COSINE
    else:
        assert np.median(aimet) >= np.median(itself) - SELF_AGREEMENT_MARGIN
        if model in ("det", "rec"):
            assert min(itself) < SIM_COSINE


def test_aimets_own_int32_bias_export_does_not_reload_strictly(compiled, tmp_path):
    """Why strict loading stops at the biases: AIMET cannot reload its own int32 biases strictly either."""
    prefix = compiled["W8A8", "1.0.0"]
    sim = _sim(prefix, "int8")
    quantsim.load_encodings_to_sim(sim, prefix + ".encodings", strict=False)
    sim.export(str(tmp_path), "aimet", export_int32_bias=True)
    with pytest.raises(AssertionError, match="settings not matching"):
        quantsim.load_encodings_to_sim(_sim(prefix, "int8"), str(tmp_path / "aimet.encodings"), strict=True)


def test_aimet_rounds_a_tie_away_from_zero_where_quantizelinear_rounds_to_even(tmp_path):
    """Why AIMET's simulation of det parts from OUT.onnx at 8 bits (docs/encodings.md): the same encodings,
    another rounding of ties."""
    from onnx import TensorProto, helper
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Relu", ["m"], ["y"])],
                              "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
                              [onnx.numpy_helper.from_array(np.eye(8, dtype=np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    config = os.path.join(os.path.dirname(aimet_onnx.__file__), "common", "quantsim_config", "htp_quantsim_config_v73.json")
    sim = quantsim.QuantizationSimModel(model, param_type="int8", activation_type="int8", config_file=config)
    unit = {"dtype": "INT", "enc_type": "PER_TENSOR", "is_sym": False, "bw": 8, "scale": [1.0], "offset": [0]}
    document = {"version": "1.0.0", "activation_encodings": [{"name": n, **unit} for n in ("x", "m", "y")],
                "param_encodings": [{"name": "w", "dtype": "INT", "enc_type": "PER_TENSOR", "is_sym": True, "bw": 8,
                                     "scale": [1 / 127], "offset": [-128]}]}
    (tmp_path / "ties.encodings").write_text(json.dumps(document))
    quantsim.load_encodings_to_sim(sim, str(tmp_path / "ties.encodings"), strict=False)
    ties = np.array([[0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 7.5]], np.float32)
    np.testing.assert_array_equal(sim.session.run(None, {"x": ties})[0], [[1, 2, 3, 4, 5, 6, 7, 8]])
    quantize = helper.make_model(helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"])], "q",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])], [helper.make_tensor_value_info("q", TensorProto.UINT8, [1, 8])],
        [onnx.numpy_helper.from_array(np.float32(1.0), "s"), onnx.numpy_helper.from_array(np.uint8(0), "z")]),
        opset_imports=[helper.make_opsetid("", 13)])
    np.testing.assert_array_equal(make_session(quantize).run(None, {"x": ties})[0], [[0, 2, 2, 4, 4, 6, 6, 8]])
