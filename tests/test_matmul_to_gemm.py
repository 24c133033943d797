"""matmul-to-gemm on a real model: PP-OCR cls's classifier head becomes a Gemm whose bias is quantized to int32."""
import json

import numpy as np
import onnx
import onnx.parser

from compiler.cli import main
from compiler.ir import const_value, from_onnx, infer_shapes
from compiler.pass_manager import PassContext, PassManager, parse_pipeline
from compiler.runtime import run_model


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


SEQUENCE = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[{dims},4] x) => (float[{dims},3] y) <float[4,3] w = {{0.5,-1,0.25, 1,0.5,-0.5, -0.25,0.75,1, 0.1,0.2,0.3}},
                                             float[3] b = {{0.1,-0.2,0.3}}> {{
  m = MatMul(x, w)
  y = Add(m, b)
}}
"""


def _sequence(dims: str):
    return from_onnx(infer_shapes(onnx.parser.parse_model(SEQUENCE.format(dims=dims))))


def test_a_sequence_of_unknown_length_becomes_rows_and_back_with_the_length_as_minus_one():
    module = _sequence("1,T")
    reference = module.to_onnx()
    context = PassContext(log=lambda m: None)
    PassManager(parse_pipeline("matmul-to-gemm"), quiet=True).run(module, context)
    assert [n.op for n in module.graph.nodes] == ["Reshape", "Gemm", "Reshape"]
    back = module.graph.nodes[-1]
    assert back.outputs[0].name == "y" and list(const_value(back.inputs[1])) == [1, -1, 3]
    for length in (1, 7):
        x = {"x": np.random.default_rng(length).standard_normal((1, length, 4)).astype(np.float32)}
        (want,), (got,) = run_model(reference, [x]), run_model(module.to_onnx(), [x])
        np.testing.assert_allclose(got["y"], want["y"], rtol=1e-6, atol=1e-6)


def test_two_unknown_leading_dimensions_are_declined_with_a_remark():
    module = _sequence("N,T")
    context = PassContext(log=lambda m: None)
    manager = PassManager(parse_pipeline("matmul-to-gemm"), quiet=True)
    manager.run(module, context)
    assert [n.op for n in module.graph.nodes] == ["MatMul", "Add"]
    assert any("more than one unknown leading dimension (pin the input shape)" in r.message for r in context.remarks)
