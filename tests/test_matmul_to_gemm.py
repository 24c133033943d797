"""matmul-to-gemm on a real model: PP-OCR cls's classifier head becomes a Gemm whose bias is quantized to int32."""
import json

import onnx

from compiler.cli import main


def test_cls_head_becomes_a_gemm_with_an_int32_bias(assets, tmp_path):
    model, out = assets / "models" / "ppocr_cls.onnx", tmp_path / "cls.onnx"
    passes = "fold-constants,cleanup,matmul-to-gemm,calibrate,propagate-encodings,insert-qdq"
    assert main(["compile", str(model), "-o", str(out), "--passes", passes, "--input-shape", "x:1,3,48,192",
                 "--calib-data", str(assets / "text_cls"), "--image-size", "48,192", "--calib-count", "4",
                 "--verify", "-q"]) == 0
    ops = [node.op_type for node in onnx.load(out).graph.node]
    assert "MatMul" not in ops and ops.count("Gemm") == 1
    encodings = json.loads(out.with_suffix(".encodings").read_text())
    biases = [e for e in encodings["param_encodings"] if e["bw"] == 32]
    assert any(e["name"] == "fc_0.b_0" for e in biases)
    assert "linear_1.tmp_0" not in {e["name"] for e in encodings["activation_encodings"]}
