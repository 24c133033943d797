"""qcc compile --target-cos: promote-16bit and insert-converts added to a target's pipeline, end to end."""
import json

import onnx
import onnx.parser
import pytest

from compiler.ir import QccError
from compiler.quantize import with_mixed_precision
from compiler.targets import TARGETS
from tests.test_compile_quantized import data, model, run  # noqa: F401 (fixtures)


def test_promotion_sits_between_propagation_and_qdq_under_the_targets_config():
    pipeline = with_mixed_precision(TARGETS["dsp"].build(), 0.995, 0.4)
    order = [p.name for p in pipeline]
    at = order.index("promote-16bit")
    assert order[at - 1:at + 3] == ["propagate-encodings", "promote-16bit", "insert-qdq", "insert-converts"]
    assert "promote-16bit{target-cos=0.995 budget=0.4" in str(pipeline) and not pipeline.config.per_channel
    assert with_mixed_precision(pipeline, 0.995) is pipeline  # already mixed: unchanged


def test_mixed_precision_corrects_biases_for_the_weights_only():
    base = TARGETS["htp"].build()
    assert base.find("bias-correction").options.mode == "sequential"
    bias = with_mixed_precision(base, 0.999).find("bias-correction")
    assert (bias.options.mode, bias.options.samples) == ("empirical", 8)


def test_sixteen_bit_activations_and_float_pipelines_are_refused():
    with pytest.raises(QccError, match="already has 16 bits"):
        with_mixed_precision(TARGETS["htp"].build(act_bits=16), 0.999)
    with pytest.raises(QccError, match="does not quantize"):
        with_mixed_precision(TARGETS["cpu"].build(), 0.999)


@pytest.mark.parametrize("extra, message", [
    (["--max-16bit-share", "0.2"], "--max-16bit-share needs --target-cos"),
    (["--passes", "calibrate,insert-qdq", "--target-cos", "0.999"], "with --passes, give the options in the pipeline"),
])
def test_flag_mistakes_are_one_line_errors(model, data, tmp_path, capsys, extra, message):  # noqa: F811
    target = [] if "--passes" in extra else ["--target", "htp"]
    code, err = run(["compile", model, *target, "--calib-data", data[0], *extra, "-o", tmp_path / "out.onnx"], capsys)
    assert code == 2 and message in err and not (tmp_path / "out.onnx").exists()


def test_real_cls_reaches_a_tighter_cosine_with_some_activations_at_16_bits(assets, tmp_path, capsys):
    out = tmp_path / "cls.onnx"
    code, err = run(["compile", assets / "models" / "ppocr_cls.onnx", "--target", "htp", "--input-shape", "x:1,3,48,192",
                     "--calib-data", assets / "text_cls", "--calib-count", "8", "--image-mean", "0.5,0.5,0.5",
                     "--image-std", "0.5,0.5,0.5", "--target-cos", "0.99995", "--max-16bit-share", "0.3", "-o", out], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "cls.report.json").read_text())
    promote = next(p for p in report["passes"] if p["name"] == "promote-16bit")["stats"]
    assert promote["promoted"] > 0 and 0 < promote["share-16bit"] <= 0.3
    assert promote["cos-after"] > promote["cos-before"]
    widths = {e["bw"] for e in json.loads((tmp_path / "cls.encodings").read_text())["activation_encodings"]}
    assert widths == {8, 16}
    quantized = onnx.load(out)
    assert any(n.op_type == "QuantizeLinear" and n.domain == "com.microsoft" for n in quantized.graph.node)


def test_compile_model_refuses_target_cos_with_its_own_pipeline():
    from compiler.ir import from_onnx
    from compiler.quantize import compile_model
    from tests.test_compile_quantized import MODEL_TEXT
    module = from_onnx(onnx.parser.parse_model(MODEL_TEXT))
    with pytest.raises(QccError, match="put promote-16bit"):
        compile_model(module, passes="calibrate,insert-qdq", target_cos=0.999)


def test_a_target_met_at_8_bits_writes_the_8_bit_compile_with_its_own_bias_correction(assets, tmp_path, capsys):
    """Nothing promoted: the mixed pipeline's float-input bias correction would cost accuracy for nothing, so the
    8-bit pipeline (sequential correction) is compiled instead, and its files are those of a plain compile."""
    common = ["--target", "htp", "--input-shape", "x:1,3,48,192", "--calib-data", assets / "text_cls", "--calib-count",
              "8", "--image-mean", "0.5,0.5,0.5", "--image-std", "0.5,0.5,0.5", "--no-htp-check", "--judge", "off"]
    model = assets / "models" / "ppocr_cls.onnx"
    code, err = run(["compile", model, *common, "--target-cos", "0.5", "-o", tmp_path / "mixed.onnx"], capsys)
    assert code == 0 and "keeps every activation at 8 bits" in err, err
    assert run(["compile", model, *common, "-o", tmp_path / "plain.onnx"], capsys)[0] == 0
    report = json.loads((tmp_path / "mixed.report.json").read_text())
    assert report["pipeline"] == json.loads((tmp_path / "plain.report.json").read_text())["pipeline"]
    assert "bias-correction{mode=sequential" in report["pipeline"] and "promote-16bit" not in report["pipeline"]
    assert (tmp_path / "mixed.encodings").read_bytes() == (tmp_path / "plain.encodings").read_bytes()
    mixed, plain = onnx.load(tmp_path / "mixed.onnx"), onnx.load(tmp_path / "plain.onnx")
    assert mixed.graph == plain.graph
