"""qcc compile writes OUT.float.onnx, the float model insert-qdq quantized (bias corrections included, so that
OUT.encodings applied to it gives OUT.onnx): analyze compares like with like."""
import json

import numpy as np
import onnx

from compiler.runtime import run_model
from tests.test_compile_quantized import data, model, run  # noqa: F401 (fixtures)


def test_float_reference_has_the_quantized_models_tensors_and_nearly_the_originals_outputs(model, data, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out.onnx"
    code, err = run(["compile", model, "--target", "htp", "--calib-data", data[0], "-o", out], capsys)
    assert code == 0, err
    reference = onnx.load(tmp_path / "out.float.onnx")
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in reference.graph.node)
    samples = [{"x": np.load(f)} for f in sorted(data[1].iterdir())]
    # The original's outputs, moved only by bias correction's per-channel shifts (here by at most 2.2e-4).
    for ref, got in zip(run_model(onnx.load(model), samples), run_model(reference, samples)):
        np.testing.assert_allclose(got["y"], ref["y"], rtol=0, atol=1e-3)
    assert "out.float.onnx" in json.loads((tmp_path / "out.report.json").read_text())["outputs"].values()

    code, err = run(["analyze", tmp_path / "out.float.onnx", out, "--data", data[0], "--json", tmp_path / "a.json", "-q"], capsys)
    assert code == 0, err
    analysis = json.loads((tmp_path / "a.json").read_text())
    assert not analysis["unmatched"] and analysis["layers"]


def test_float_target_writes_no_reference(model, tmp_path, capsys):  # noqa: F811
    code, err = run(["compile", model, "--target", "cpu", "-o", tmp_path / "out.onnx"], capsys)
    assert code == 0, err
    assert not (tmp_path / "out.float.onnx").exists()


def test_float_reference_holds_each_int32_bias_at_the_value_the_qdq_model_adds(model, data, tmp_path, capsys):  # noqa: F811
    """A consumer that leaves biases float (AIMET's HTP configs) adds exactly what OUT.onnx adds."""
    out = tmp_path / "out.onnx"
    code, err = run(["compile", model, "--target", "htp", "--calib-data", data[0], "-o", out], capsys)
    assert code == 0, err
    compiled, reference = onnx.load(out), onnx.load(tmp_path / "out.float.onnx")
    stored = {t.name: onnx.numpy_helper.to_array(t) for t in compiled.graph.initializer}
    floats = {t.name: onnx.numpy_helper.to_array(t) for t in reference.graph.initializer}
    quantized = json.loads({p.key: p.value for p in compiled.metadata_props}["qcc.qdq-constants"])
    biases = {name: codes for name, codes in quantized.items() if stored[codes].dtype == np.int32}
    assert biases
    scales = {n.input[0]: stored[n.input[1]] for n in compiled.graph.node if n.op_type == "DequantizeLinear"}
    for name, codes in biases.items():
        dequantized = stored[codes].astype(np.float32) * scales[codes].astype(np.float32)
        np.testing.assert_array_equal(floats[name], dequantized, err_msg=name)
