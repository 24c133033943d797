"""insert-qdq: the QDQ form onnxruntime (CPU and QNN EP) reads, Qualcomm's encoding rules, idempotence."""
import numpy as np
import onnx.parser
import onnxruntime as ort

from compiler.encoding import Encoding, activation_encoding, encoding_from_qdq, fake_quantize
from tests.golden_cases import cosine
from compiler.ir import const_value, from_onnx, infer_shapes
from compiler.pass_manager import PassContext, PassManager, parse_pipeline
from compiler.runtime import run_model, sample_inputs

CONV = """
<ir_version: 8, opset_import: ["" : OPSET]>
g (float[1,2,4,4] x) => (float[1,3,4,4] y, float[1,3] z)
  <float[3,2,1,1] w = {1.0, -2.0, 0.0, 0.0, 0.5, 3.0}, float[3] b = {0.1, 0.0, -0.2},
   float[4,3] ct = {0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2}, float[3,4] m = {1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 1.0, 2.0, 3.0},
   float[3,4] gw = {1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 1.0, 2.0, 3.0}, int64[2] shape = {1, 48}, float[48,3] fc = {0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2},
   float[3] k = {0.5, 1.0, 2.0}> {
  c = Conv(x, w, b)
  y = Relu(c)
  f = Reshape(y, shape)
  h = MatMul(f, fc)
  g2 = Gemm(h, gw)
  z = Gemm <transB = 1> (g2, m)
}
"""


def _module(opset=13, text=CONV):
    return from_onnx(infer_shapes(onnx.parser.parse_model(text.replace("OPSET", str(opset)))))


def _compile(module, pipeline="calibrate{method=minmax},propagate-encodings,insert-qdq", samples=None):
    samples = samples or sample_inputs(module, PassContext(seed=0), count=4)
    ctx = PassContext(calib_data=samples, log=lambda m: None)
    manager = PassManager(parse_pipeline(pipeline), quiet=True)
    manager.run(module, ctx)
    return manager, ctx, samples


def _dq_feeding(module, node, index):
    producer = node.inputs[index].inputs[0]
    assert producer.op == "DequantizeLinear", f"{node.op} input {index} is not dequantized"
    scale, zero_point = (const_value(t) for t in producer.inputs[1:3])
    return producer, const_value(producer.inputs[0]), scale, zero_point


def test_every_float_input_is_dequantized_and_onnxruntime_runs_it():
    module = _module()
    original = module.clone()
    _, _, samples = _compile(module)
    for node in module.graph.nodes:
        if node.op in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for i, tensor in enumerate(node.inputs):
            if tensor.dtype is not None and np.issubdtype(np.dtype(tensor.dtype), np.floating):
                _dq_feeding(module, node, i)
    ref, got = run_model(original, samples), run_model(module, samples)
    for r, g in zip(ref, got):
        assert cosine(r["z"], g["z"]) > 0.999 and cosine(r["y"], g["y"]) > 0.999
    proto = module.to_onnx()
    onnx.checker.check_model(proto)
    optimized = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])  # ORT's QDQ fusions accept it
    assert optimized.run(None, samples[0])[0].shape == (1, 3, 4, 4)


def test_weight_axes_bias_and_zero_channel_follow_qnn_rules():
    module = _module()
    _compile(module)
    nodes = {n.outputs[0].name: n for n in module.graph.nodes if n.op not in ("QuantizeLinear", "DequantizeLinear")}
    conv_w = _dq_feeding(module, nodes["c"], 1)
    assert conv_w[0].attrs["axis"] == 0 and conv_w[1].dtype == np.int8 and not conv_w[3].any()
    assert conv_w[2][1] > 0 and not conv_w[1][1].any(), "the zero channel needs a valid scale and zero weights"
    assert "axis" not in _dq_feeding(module, nodes["h"], 1)[0].attrs  # MatMul: per tensor
    assert _dq_feeding(module, nodes["g2"], 1)[0].attrs["axis"] == 1  # Gemm transB=0: [K, N]
    assert _dq_feeding(module, nodes["z_float"], 1)[0].attrs["axis"] == 0   # Gemm transB=1 (a graph output: z_float)
    _, stored, bias_scale, bias_zp = _dq_feeding(module, nodes["c"], 2)
    _, _, x_scale, _ = _dq_feeding(module, nodes["c"], 0)
    assert stored.dtype == np.int32 and not bias_zp.any()
    np.testing.assert_array_equal(bias_scale, (x_scale * conv_w[2]).astype(np.float32))
    np.testing.assert_array_equal(stored, np.round(np.array([0.1, 0.0, -0.2]) / bias_scale.astype(np.float64)))
    encoded = encoding_from_qdq(conv_w[2], conv_w[3], 0)
    assert module.encodings["w"] == encoded


def test_qdq_model_equals_fake_quantization():
    text = """<ir_version: 8, opset_import: ["" : 13]>
g (float[1,2,3,3] x) => (float[1,2,3,3] y) <float[2,2,1,1] w = {0.3, -0.7, 1.1, 0.05}, float[2] b = {0.01, -0.4}> {
  y = Conv(x, w, b)
}"""
    module = _module(text=text)
    _, _, samples = _compile(module)
    enc = module.encodings
    x = fake_quantize(samples[0]["x"], enc["x"])
    w = fake_quantize(const_value(_module(text=text).graph.nodes[0].inputs[1]), enc["w"])
    b = fake_quantize(np.array([0.01, -0.4], np.float32), enc["b"])
    conv = np.einsum("oc,nchw->nohw", w[:, :, 0, 0].astype(np.float64), x.astype(np.float64)) + b[None, :, None, None]
    expected = fake_quantize(conv.astype(np.float32), enc["y"])
    got = run_model(module, samples[:1])[0]["y"]
    np.testing.assert_allclose(got, expected, atol=enc["y"].scale[0] * 1.01)


def test_second_run_changes_nothing_and_graph_output_keeps_its_name():
    module = _module()
    _compile(module)
    assert [t.name for t in module.graph.outputs] == ["y", "z"]
    assert all(t.inputs[0].op == "DequantizeLinear" for t in module.graph.outputs)
    manager, _, _ = _compile(module)
    assert not any(r.modified for r in manager.records)


def test_16_bit_activations_use_the_contrib_domain_below_opset_21():
    module = _module(13)
    _compile(module, "quant{act-bits=16},calibrate{method=minmax},insert-qdq")
    q = [n for n in module.graph.nodes if n.op == "QuantizeLinear"]
    assert q and all(n.domain == "com.microsoft" and n.outputs[0].dtype == np.uint16 for n in q)
    assert all(module.encodings[n.inputs[0].name].bw == 16 for n in q if n.inputs[0].name in module.encodings)
    ort.InferenceSession(module.to_onnx().SerializeToString(), providers=["CPUExecutionProvider"])
    modern = _module(21)
    _compile(modern, "quant{act-bits=16},calibrate{method=minmax},insert-qdq")
    assert all(n.domain == "" for n in modern.graph.nodes if n.op == "QuantizeLinear")
    run_model(modern, sample_inputs(modern, PassContext(seed=1), count=1))


def test_act_bits_annotation_mixes_bit_widths():
    module = _module()
    module.annotate("c", act_bits=16)
    _compile(module, "calibrate{method=minmax},insert-qdq")
    widths = {n.inputs[0].name: n.outputs[0].dtype for n in module.graph.nodes if n.op == "QuantizeLinear"}
    assert widths["c"] == np.uint16 and widths["x"] == np.uint8


def test_4_bit_weights_stored_as_int8_in_range():
    module = _module()
    _compile(module, "quant{weight-bits=4},calibrate{method=minmax},insert-qdq")
    assert module.encodings["w"].bw == 4 and module.encodings["w"].offset[0] == -8
    conv = next(n for n in module.graph.nodes if n.op == "Conv")
    stored = _dq_feeding(module, conv, 1)[1]
    assert stored.dtype == np.int8 and stored.min() >= -8 and stored.max() <= 7 and stored.max() == 7


def test_per_tensor_when_asked_or_below_opset_13():
    module = _module()
    _compile(module, "quant{per-channel=false},calibrate{method=minmax},insert-qdq")
    assert all("axis" not in n.attrs for n in module.graph.nodes if n.op == "DequantizeLinear")
    old = _module(12)
    _, ctx, _ = _compile(old)
    assert any("per tensor" in r.message for r in ctx.remarks)
    assert all(len(module.encodings[k].scale) == 1 for k in ("w", "gw", "m"))


def test_given_weight_encoding_is_used_and_bias_overflow_raises_weight_scale():
    module = _module()
    given = Encoding(bw=8, scale=(0.02, 0.001, 0.03), offset=(-128,) * 3, symmetric=True, axis=0)
    module.encodings["w"] = given
    _compile(module)
    assert module.encodings["w"] == given
    tiny = _module()
    tiny.annotate("x", fixed_range=(0.0, 1e-3))  # s_in ~ 4e-6: a bias of 1e4 would overflow int32 with s_w ~ 1e-2
    tiny.graph.nodes[0].inputs[2].values = np.array([1e4, 0.0, -0.2], np.float32)
    _, ctx, _ = _compile(tiny)
    assert any("int32 bias" in r.message for r in ctx.remarks)
    bias = next(n for n in tiny.graph.nodes if n.op == "Conv").inputs[2].inputs[0]
    assert abs(const_value(bias.inputs[0]).astype(np.int64)).max() < 2 ** 31 - 1


def test_constants_of_elementwise_ops_are_quantized_like_activations():
    text = """<ir_version: 8, opset_import: ["" : 13]>
g (float[1,3] x) => (float[1,3] y) <float[3] k = {0.5, 1.0, 2.0}, float lo = {0.0}, float hi = {6.0}> {
  m = Mul(x, k)
  y = Clip(m, lo, hi)
}"""
    module = _module(text=text)
    _compile(module)
    assert module.encodings["k"] == activation_encoding(0.0, 2.0, 8)
    clip = next(n for n in module.graph.nodes if n.op == "Clip")
    assert [t.name for t in clip.inputs[1:]] == ["lo", "hi"]  # parameters stay float
