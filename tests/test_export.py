"""Encodings files: both layouts, numbers identical to the QDQ nodes, and a lossless round trip."""
import json

import numpy as np
import onnx.parser
import pytest

from compiler.encoding import qdq_params
from compiler.encodings_check import check_encodings
from compiler.export import (apply_encodings, encodings_document, left_out_activations, qdq_encodings, read_encodings,
                             tool_encodings, write_encodings)
from compiler.ir import QccError, const_value, from_onnx, infer_shapes
from compiler.pass_manager import PassContext, PassManager, parse_pipeline
from compiler.runtime import sample_inputs

MODEL = """<ir_version: 8, opset_import: ["" : 13]>
g (float[1,2,4,4] x) => (float[1,2] y, float[1,3,4,4] r)
  <float[3,2,1,1] w = {1.0, -2.0, 0.0, 0.0, 0.5, 3.0}, float[3] b = {0.1, 0.0, -0.2}, float[3] k = {0.5, 1.0, 2.0},
   float[3,2] fc = {0.1, -0.2, 0.3, 0.4, -0.5, 0.6}> {
  c = Conv(x, w, b)
  r = Relu(c)
  p = GlobalAveragePool(r)
  f = Flatten(p)
  m = Mul(f, k)
  g = MatMul(m, fc)
  y = Softmax <axis = 1> (g)
}"""
PIPELINE = "calibrate{method=percentile},propagate-encodings,insert-qdq"


def _float():
    return from_onnx(infer_shapes(onnx.parser.parse_model(MODEL)))


def _compile(module, pipeline=PIPELINE):
    ctx = PassContext(calib_data=sample_inputs(module, PassContext(seed=0), count=4), log=lambda m: None)
    PassManager(parse_pipeline(pipeline), quiet=True).run(module, ctx)
    return module


def _qdq_nodes(module):
    return [n for n in module.graph.nodes if n.op in ("QuantizeLinear", "DequantizeLinear")]


@pytest.mark.parametrize("fmt", ["1.0.0", "2.0.0", "0.6.1"])
def test_numbers_in_the_file_are_those_of_the_qdq_nodes(tmp_path, fmt):
    module = _float()
    module.annotate("c", act_bits=16)
    _compile(module)
    path = tmp_path / "m.encodings"
    write_encodings(module, path, fmt)
    given = {**read_encodings(path)[0], **read_encodings(path)[1]}  # 2.0.0 has no activation/parameter split
    stored = json.loads(module.metadata["qcc.qdq-constants"])
    by_stored = {v: k for k, v in stored.items()}
    outputs = {t.name for t in module.graph.outputs}
    checked = 0
    left_out = left_out_activations(module, qdq_encodings(module)[0])
    for node in _qdq_nodes(module):
        if node.op == "QuantizeLinear":
            dq = node.outputs[0].outputs[0]
            name = dq.outputs[0].name if dq.outputs[0].name in outputs else node.inputs[0].name
            if name in left_out:
                continue
            enc = given[name]
        elif node.inputs[0].name in by_stored:
            enc = given[by_stored[node.inputs[0].name]]
        else:
            continue  # the DQ of an activation: checked with its Q
        scale, zero_point = qdq_params(enc)
        np.testing.assert_array_equal(const_value(node.inputs[1]), scale)
        np.testing.assert_array_equal(const_value(node.inputs[2]), zero_point)
        assert const_value(node.inputs[2]).dtype == zero_point.dtype
        checked += 1
    q_nodes = [n for n in module.graph.nodes if n.op == "QuantizeLinear"]
    assert set(left_out) == {"f"}  # Flatten's output: Qualcomm's tools quantize its input p only
    assert len(given) == len(q_nodes) - 1 + len(stored) and set(stored) == {"w", "b", "k", "fc"}
    assert checked == len(given)
    assert given["c"].bw == 16 and given["x"].bw == 8 and given["b"].bw == 32


def test_layouts_use_aimet_field_names(tmp_path):
    module = _compile(_float())
    v1 = encodings_document(module, "1.0.0")
    assert v1["version"] == "1.0.0" and isinstance(v1["activation_encodings"], list)
    weight = next(e for e in v1["param_encodings"] if e["name"] == "w")
    assert set(weight) == {"name", "dtype", "enc_type", "is_sym", "bw", "scale", "offset"}
    assert weight["enc_type"] == "PER_CHANNEL" and weight["is_sym"] is True and weight["offset"] == [-128] * 3
    relu = next(e for e in v1["activation_encodings"] if e["name"] == "r")
    assert relu["enc_type"] == "PER_TENSOR" and relu["is_sym"] is False and relu["offset"] == [0] and relu["dtype"] == "INT"
    legacy = encodings_document(module, "0.6.1")
    assert legacy["version"] == "0.6.1" and isinstance(legacy["param_encodings"], dict)
    channels = legacy["param_encodings"]["w"]
    assert len(channels) == 3 and set(channels[0]) == {"bitwidth", "dtype", "is_symmetric", "max", "min", "offset", "scale"}
    assert channels[0]["is_symmetric"] == "True" and legacy["activation_encodings"]["r"][0]["is_symmetric"] == "False"
    assert channels[0]["min"] == pytest.approx(-128 * channels[0]["scale"])
    v2 = encodings_document(module, "2.0.0")
    assert set(v2) == {"version", "encodings"} and v2["version"] == "2.0.0"
    entries = {e["name"]: e for e in v2["encodings"]}
    assert set(entries["w"]) == {"name", "output_dtype", "y_scale", "axis"}  # symmetric: no zero point
    assert entries["w"]["output_dtype"] == "int8" and entries["w"]["axis"] == 0 and len(entries["w"]["y_scale"]) == 3
    assert entries["b"]["output_dtype"] == "int32" and entries["r"]["output_dtype"] == "uint8"
    assert isinstance(entries["r"]["y_scale"], float) and "axis" not in entries["r"]
    assert entries["x"]["y_zero_point"] == -next(e for e in v1["activation_encodings"] if e["name"] == "x")["offset"][0]


@pytest.mark.parametrize("fmt", ["1.0.0", "2.0.0", "0.6.1"])
def test_loading_the_file_reproduces_the_qdq_model(tmp_path, fmt):
    module = _float()
    module.annotate("c", act_bits=16)
    _compile(module, "quant{weight-bits=4}," + PIPELINE)
    path = tmp_path / "m.encodings"
    write_encodings(module, path, fmt)
    fresh = _float()
    applied = apply_encodings(fresh, *read_encodings(path))
    assert applied["activations"] + applied["restored"] == len([n for n in module.graph.nodes if n.op == "QuantizeLinear"])
    PassManager(parse_pipeline("quant{weight-bits=4},insert-qdq"), quiet=True).run(fresh, PassContext(log=lambda m: None))
    assert fresh.to_onnx().graph.SerializeToString() == module.to_onnx().graph.SerializeToString()
    assert qdq_encodings(fresh) == qdq_encodings(module)


def test_errors(tmp_path):
    with pytest.raises(QccError, match="nothing to export"):
        encodings_document(_float())
    with pytest.raises(QccError, match="unknown encodings format"):
        encodings_document(_compile(_float()), "2.0")
    bad = tmp_path / "bad.encodings"
    bad.write_text("{not json")
    with pytest.raises(QccError, match="bad.encodings: cannot read encodings"):
        read_encodings(bad)


def test_a_slice_output_on_its_input_grid_is_left_out_as_aimet_keeps_no_quantizer_there():
    text = """<ir_version: 8, opset_import: ["" : 13]>
g (float[1,2,4,4] x) => (float[1,1,4,4] s) <float[2,2,1,1] w = {1.0, -2.0, 0.5, 3.0}, int64[1] zero = {0},
                                           int64[1] one = {1}, int64[1] axis = {1}> {
  c = Conv(x, w)
  s = Slice(c, zero, one, axis)
}"""
    module = _compile(from_onnx(infer_shapes(onnx.parser.parse_model(text))))
    activations = qdq_encodings(module)[0]
    assert activations["s"] == activations["c"]  # Slice shares its input's encoding
    assert set(left_out_activations(module, activations)) == {"s"}


ATTENTION = """<ir_version: 8, opset_import: ["" : 13]>
g (float[1,4,8] x) => (float[1,4,4] y) <float[8,8] wq = {0.5,-1,0.25,1,0.5,-0.5,-0.25,0.75, 1,0.1,0.2,0.3,-0.4,0.5,0.6,-0.7,
  0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8, -0.1,-0.2,0.3,0.4,-0.5,0.6,0.7,0.8, 0.3,0.1,-0.2,0.5,0.4,-0.6,0.2,0.1,
  0.2,-0.3,0.4,0.1,0.6,0.5,-0.1,0.3, -0.5,0.2,0.1,0.3,0.2,0.1,0.4,-0.2, 0.1,0.3,0.5,-0.2,0.1,0.2,0.3,0.4},
  float[8,8] wk = {0.2,0.1,-0.3,0.4,0.5,0.1,0.2,0.3, 0.1,-0.2,0.3,0.4,0.5,0.6,-0.1,0.2, 0.3,0.4,0.1,0.2,-0.3,0.1,0.5,0.2,
  0.4,0.3,0.2,0.1,0.2,0.3,0.4,0.5, -0.1,0.2,0.3,-0.4,0.1,0.2,0.3,0.1, 0.2,0.1,0.5,0.3,0.1,-0.2,0.1,0.4,
  0.1,0.4,0.2,0.1,0.3,0.1,-0.2,0.3, 0.5,0.2,0.1,0.3,0.2,0.4,0.1,0.9}> {
  q = MatMul(x, wq)
  k = MatMul(x, wk)
  kt = Transpose <perm = [0, 2, 1]> (k)
  y = MatMul(q, kt)
}"""


@pytest.mark.parametrize("fmt", ["1.0.0", "2.0.0", "0.6.1"])
def test_a_second_matmul_input_is_written_symmetric_and_read_back_as_the_same_unsigned_grid(tmp_path, fmt):
    attention = lambda: from_onnx(infer_shapes(onnx.parser.parse_model(ATTENTION)))
    module = _compile(attention(), "calibrate{method=minmax},propagate-encodings,insert-qdq")
    activations = tool_encodings(module)[0]
    assert activations["k"].symmetric and activations["k"].offset == (-128,)  # kt, a Transpose of k, is left out
    assert not activations["q"].symmetric and not activations["y"].symmetric
    quantize = next(n for n in module.graph.nodes if n.op == "QuantizeLinear" and n.inputs[0].name == "k")
    assert const_value(quantize.inputs[2]).dtype == np.uint8 and const_value(quantize.inputs[2]) == 128
    path = tmp_path / "m.encodings"
    write_encodings(module, path, fmt)
    assert check_encodings(module, *read_encodings(path)) == []
    fresh = attention()
    apply_encodings(fresh, *read_encodings(path))
    PassManager(parse_pipeline("insert-qdq"), quiet=True).run(fresh, PassContext(log=lambda m: None))
    assert fresh.to_onnx().graph.SerializeToString() == module.to_onnx().graph.SerializeToString()
