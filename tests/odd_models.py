"""A corpus of odd models, generated in code: each CASES entry builds one model and says what qcc must do with it.

A builder takes a scratch folder and returns an ``onnx.ModelProto`` (the harness saves it as ``model.onnx``) or
the path of a model it wrote itself (external data). ``Case.expect`` maps each command the harness runs
(``print``, ``cpu``: ``compile --target cpu``, ``htp``: ``compile --target htp`` with generated calibration
samples) to ``OK`` (exit 0; a written model loads in onnxruntime and matches (cpu) or is finite (htp)) or to
``refuse(pattern)`` (exit 2, one ``qcc: error:`` line matching the pattern: the file, node, tensor or opset to
blame). ``Case.xfail`` holds, per command, the area and symptom of a known failure another change fixes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnx.parser
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import convert_model_to_external_data

OK = "ok"
COMMANDS = ("print", "cpu", "htp")


def refuse(pattern: str) -> str:
    return "refuse:" + pattern


@dataclass(frozen=True)
class Case:
    build: Callable[[Path], "onnx.ModelProto | Path"]
    expect: dict  # command -> OK | refuse(pattern)
    xfail: dict = field(default_factory=dict)  # command -> "area: symptom"
    input_shapes: tuple = ()  # --input-shape flags for both compiles
    sample: Callable | None = None  # rng -> {input name: array}; default: noise shaped like the inputs
    slow: bool = False  # only print and cpu (see test_odd_models)


def named(tensor: str) -> str:
    """A pattern for an error line naming ``tensor`` ('w' or (w))."""
    return rf"[('\"]{tensor}[)'\"]"


def all_ok(**overrides) -> dict:
    return {c: overrides.get(c, OK) for c in COMMANDS}


def compiles_refused(pattern: str, **overrides) -> dict:
    """Printed as it is; both compiles refuse, naming ``pattern``."""
    return {"print": overrides.get("print", OK), "cpu": overrides.get("cpu", refuse(pattern)),
            "htp": overrides.get("htp", refuse(pattern))}


def all_refused(pattern: str) -> dict:
    return {c: refuse(pattern) for c in COMMANDS}


# --- building blocks ---------------------------------------------------------------------------------------

def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def text_model(text: str, weights: dict | None = None, *, dtype=np.float32, seed: int = 0,
               weights_as_inputs: bool = False) -> onnx.ModelProto:
    """``text`` in ONNX text syntax; ``weights`` (name -> shape, or an array) become seeded initializers.
    ``weights_as_inputs`` also lists them as graph inputs (required by IR version 3)."""
    model = onnx.parser.parse_model(text)
    rng = _rng(seed)
    for name, spec in (weights or {}).items():
        values = spec if isinstance(spec, np.ndarray) else (rng.standard_normal(spec) * 0.5).astype(dtype)
        model.graph.initializer.append(numpy_helper.from_array(values, name))
        if weights_as_inputs:
            model.graph.input.append(helper.make_tensor_value_info(
                name, helper.np_dtype_to_tensor_dtype(values.dtype), values.shape))
    return model


def conv_relu(opset: int = 13, ir: int = 8, dtype: str = "float", np_dtype=np.float32) -> onnx.ModelProto:
    return text_model(f"""
<ir_version: {ir}, opset_import: ["" : {opset}]>
g ({dtype}[1,3,8,8] x) => ({dtype}[1,4,8,8] y) {{
  c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
  y = Relu(c)
}}""", {"w": (4, 3, 3, 3), "b": (4,)}, dtype=np_dtype)


def _with_weight(model: onnx.ModelProto, name: str, values: np.ndarray) -> onnx.ModelProto:
    for i, init in enumerate(model.graph.initializer):
        if init.name == name:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(values, name))
    return model


# --- the cases -------------------------------------------------------------------------------------

def contrib_gelu(_):
    return text_model("""
<ir_version: 8, opset_import: ["" : 13, "com.microsoft" : 1]>
g (float[1,8] x) => (float[1,8] y) {
  m = MatMul(x, w)
  y = com.microsoft.Gelu(m)
}""", {"w": (8, 8)})


def custom_domain_op(_):
    return text_model("""
<ir_version: 8, opset_import: ["" : 13, "org.example" : 1]>
g (float[1,8] x) => (float[1,8] y) {
  m = MatMul(x, w)
  y = org.example.Frobnicate(m)
}""", {"w": (8, 8)})


def conv_zero_size_weight(_):
    return text_model("""
<ir_version: 8, opset_import: ["" : 13]>
g (float[1,3,8,8] x) => (float[1,0,8,8] y) {
  y = Conv(x, w)
}""", {"w": np.zeros((0, 3, 1, 1), np.float32)})


def bfloat16_model(_):
    model = text_model("""
<ir_version: 8, opset_import: ["" : 13]>
g (bfloat16[1,3,8,8] x) => (bfloat16[1,4,8,8] y) {
  c = Conv <pads = [1, 1, 1, 1]> (x, w)
  y = Relu(c)
}""")
    weight = helper.make_tensor("w", TensorProto.BFLOAT16, (4, 3, 3, 3),
                                (_rng().standard_normal(108) * 0.5).astype(np.float32).tolist())
    model.graph.initializer.append(weight)
    return model


def conv_int32_weight(_):
    return text_model("""
<ir_version: 8, opset_import: ["" : 13]>
g (float[1,3,8,8] x) => (float[1,4,8,8] y) {
  y = Conv <pads = [1, 1, 1, 1]> (x, w)
}""", {"w": np.ones((4, 3, 3, 3), np.int32)})


def graph_input_with_initializer(_):
    # The scale is an input with a default value: a caller may override it, so it stays an input.
    return text_model("""
<ir_version: 8, opset_import: ["" : 13]>
g (float[1,3,8,8] x, float[1] scale) => (float[1,4,8,8] y) {
  c = Conv <pads = [1, 1, 1, 1]> (x, w)
  y = Mul(c, scale)
}""", {"w": (4, 3, 3, 3), "scale": np.array([2.0], np.float32)})


def float16_model(_):
    return conv_relu(dtype="float16", np_dtype=np.float16)


def float64_model(_):
    # onnxruntime's CPU Conv has no double kernel; MatMul and Add do.
    return text_model("""
<ir_version: 8, opset_import: ["" : 13]>
g (double[1,8] x) => (double[1,4] y) {
  m = MatMul(x, w)
  y = Add(m, b)
}""", {"w": (8, 4), "b": (4,)}, dtype=np.float64)


def nan_weight(_):
    w = (_rng().standard_normal((4, 3, 3, 3)) * 0.5).astype(np.float32)
    w[1, 0, 0, 0] = np.nan
    return _with_weight(conv_relu(), "w", w)


def inf_weight(_):
    b = np.array([0.1, np.inf, 0.0, -0.2], np.float32)
    return _with_weight(conv_relu(), "b", b)


def nan_bn_variance(_):
    model = text_model("""
<ir_version: 8, opset_import: ["" : 13]>
g (float[1,3,8,8] x) => (float[1,4,8,8] y) {
  c = Conv <pads = [1, 1, 1, 1]> (x, w)
  y = BatchNormalization(c, gamma, beta, mean, var)
}""", {"w": (4, 3, 3, 3), "gamma": np.ones(4, np.float32), "beta": np.zeros(4, np.float32),
       "mean": np.zeros(4, np.float32), "var": np.array([1, np.nan, 1, 1], np.float32)})
    return model


# --- opsets and IR versions --------------------------------------------------------------------------------

def opset7_ir3(_):
    return text_model("""
<ir_version: 3, opset_import: ["" : 7]>
g (float[1,3,8,8] x) => (float[1,4,8,8] y) {
  c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
  y = Relu(c)
}""", {"w": (4, 3, 3, 3), "b": (4,)}, weights_as_inputs=True)


def opset6(_):
    return conv_relu(opset=6, ir=3)


def opset9_upsample_bn(_):
    # BatchNormalization with opset 9's attributes, Upsample (deprecated at 10).
    return text_model("""
<ir_version: 4, opset_import: ["" : 9]>
g (float[1,3,4,4] x) => (float[1,4,8,8] y) {
  c = Conv <pads = [1, 1, 1, 1]> (x, w)
  n = BatchNormalization <epsilon = 0.001> (c, gamma, beta, mean, var)
  r = Relu(n)
  y = Upsample <mode = "nearest"> (r, scales)
}""", {"w": (4, 3, 3, 3), "gamma": np.full(4, 1.5, np.float32), "beta": np.full(4, 0.1, np.float32),
       "mean": np.full(4, 0.2, np.float32), "var": np.full(4, 2.0, np.float32),
       "scales": np.array([1, 1, 2, 2], np.float32)})


def opset7_upsample_attr(_):
    return text_model("""
<ir_version: 3, opset_import: ["" : 7]>
g (float[1,3,4,4] x) => (float[1,4,8,8] y) {
  c = Conv <pads = [1, 1, 1, 1]> (x, w)
  y = Upsample <mode = "nearest", scales = [1.0, 1.0, 2.0, 2.0]> (c)
}""", {"w": (4, 3, 3, 3)}, weights_as_inputs=True)


def opset10_resize(_):
    return text_model("""
<ir_version: 5, opset_import: ["" : 10]>
g (float[1,3,4,4] x) => (float[1,4,8,8] y) {
  c = Conv <pads = [1, 1, 1, 1]> (x, w)
  y = Resize <mode = "nearest"> (c, scales)
}""", {"w": (4, 3, 3, 3), "scales": np.array([1, 1, 2, 2], np.float32)})


def opset11_resize_linear(_):
    return text_model("""
<ir_version: 6, opset_import: ["" : 11]>
g (float[1,3,4,4] x) => (float[1,4,8,8] y) {
  c = Conv <pads = [1, 1, 1, 1]> (x, w)
  y = Resize <mode = "linear", coordinate_transformation_mode = "align_corners"> (c, roi, scales)
}""", {"w": (4, 3, 3, 3), "roi": np.zeros(0, np.float32), "scales": np.array([1, 1, 2, 2], np.float32)})


def opset8_clip_attrs(_):
    return text_model("""
<ir_version: 3, opset_import: ["" : 8]>
g (float[1,3,8,8] x) => (float[1,4,8,8] y) {
  c = Conv <pads = [1, 1, 1, 1]> (x, w)
  y = Clip <min = 0.0, max = 6.0> (c)
}""", {"w": (4, 3, 3, 3)}, weights_as_inputs=True)


def opset17_layernorm(_):
    return text_model("""
<ir_version: 8, opset_import: ["" : 17]>
g (float[1,4,16] x) => (float[1,4,16] y) {
  m = MatMul(x, w)
  y = LayerNormalization <axis = -1, epsilon = 0.00001> (m, gamma, beta)
}""", {"w": (16, 16), "gamma": np.ones(16, np.float32), "beta": np.zeros(16, np.float32)})


def opset18_reduce_axes_input(_):
    return text_model("""
<ir_version: 8, opset_import: ["" : 18]>
g (float[1,3,8,8] x) => (float[1,4,1,1] y) {
  c = Conv <pads = [1, 1, 1, 1]> (x, w)
  y = ReduceMean <keepdims = 1> (c, axes)
}""", {"w": (4, 3, 3, 3), "axes": np.array([2, 3], np.int64)})


def opset21_ir10(_):
    return conv_relu(opset=21, ir=10)


def opset23_ir10(_):
    return conv_relu(opset=23, ir=10)


def opset_future(_):
    model = conv_relu(opset=23, ir=10)
    model.opset_import[0].version = 99
    return model


def ir9_opset19(_):
    return conv_relu(opset=19, ir=9)


# --- external data ------------------------------------------------------------------------------------------

def _external(folder: Path, keep_data: bool, location: str = "weights.bin") -> Path:
    model = text_model("""
<ir_version: 8, opset_import: ["" : 13]>
g (float[1,64] x) => (float[1,64] y) {
  m = MatMul(x, w)
  y = Add(m, b)
}""", {"w": (64, 64), "b": (64,)})
    convert_model_to_external_data(model, all_tensors_to_one_file=True, location=location, size_threshold=0)
    (folder / location).parent.mkdir(exist_ok=True)
    path = folder / "ext.onnx"
    onnx.save_model(model, path)
    if not keep_data:
        (folder / location).unlink()
    return path


def external_data(folder):
    return _external(folder, keep_data=True)


def external_data_missing(folder):
    return _external(folder, keep_data=False)


# --- subgraphs ------------------------------------------------------------------------------------------------

def if_subgraph(_):
    return text_model("""
<ir_version: 8, opset_import: ["" : 13]>
g (float[1,4] x, bool c) => (float[1,4] y) {
  y = If (c) <
    then_branch = t () => (float[1,4] a) { a = Relu(x) },
    else_branch = e () => (float[1,4] b) { b = Neg(x) }
  >
}""")


def loop_subgraph(_):
    return text_model("""
<ir_version: 8, opset_import: ["" : 13]>
g (float[1,4] x) => (float[1,4] y) {
  n = Constant <value = int64 {3}> ()
  t = Constant <value = bool {1}> ()
  y = Loop (n, t, x) <
    body = b (int64 i, bool cond, float[1,4] v) => (bool cond_out, float[1,4] v_out) {
      cond_out = Identity(cond)
      v_out = Relu(v)
    }
  >
}""")


# --- dtypes ---------------------------------------------------------------------------------------------------

def int8_input_cast(_):
    return text_model("""
<ir_version: 8, opset_import: ["" : 13]>
g (int8[1,3,8,8] x) => (float[1,4,8,8] y) {
  f = Cast <to = 1> (x)
  y = Conv <pads = [1, 1, 1, 1]> (f, w)
}""", {"w": (4, 3, 3, 3)})


def int64_tokens_gather(_):
    return text_model("""
<ir_version: 8, opset_import: ["" : 13]>
g (int64[1,6] ids) => (float[1,6,8] y) {
  e = Gather <axis = 0> (table, ids)
  m = MatMul(e, w)
  y = Relu(m)
}""", {"table": (10, 8), "w": (8, 8)})


def bool_input_where(_):
    return text_model("""
<ir_version: 8, opset_import: ["" : 13]>
g (bool[1,8] mask, float[1,8] x) => (float[1,8] y) {
  m = MatMul(x, w)
  y = Where(mask, m, x)
}""", {"w": (8, 8)})


def scalar_input(_):
    return text_model("""
<ir_version: 8, opset_import: ["" : 13]>
g (float[1,8] x, float s) => (float[1,8] y) {
  m = MatMul(x, w)
  y = Mul(m, s)
}""", {"w": (8, 8)})


def argmax_int64_output(_):
    return text_model("""
<ir_version: 8, opset_import: ["" : 13]>
g (float[1,8] x) => (float[1,4] y, int64[1,1] k) {
  y = MatMul(x, w)
  k = ArgMax <axis = 1, keepdims = 1> (y)
}""", {"w": (8, 4)})


# --- already quantized ----------------------------------------------------------------------------------------

def qdq_model(_):
    return text_model("""
<ir_version: 8, opset_import: ["" : 13]>
g (float[1,3,8,8] x) => (float[1,4,8,8] y) {
  xq = QuantizeLinear(x, xs, xz)
  xd = DequantizeLinear(xq, xs, xz)
  wd = DequantizeLinear(wq, ws, wz)
  c = Conv <pads = [1, 1, 1, 1]> (xd, wd)
  y = Relu(c)
}""", {"xs": np.array(0.02, np.float32), "xz": np.array(128, np.uint8),
       "wq": _rng().integers(-100, 100, (4, 3, 3, 3)).astype(np.int8), "ws": np.array(0.005, np.float32),
       "wz": np.array(0, np.int8)})


def qlinearconv_model(_):
    return text_model("""
<ir_version: 8, opset_import: ["" : 13]>
g (float[1,3,8,8] x) => (float[1,4,8,8] y) {
  xq = QuantizeLinear(x, xs, xz)
  cq = QLinearConv <pads = [1, 1, 1, 1]> (xq, xs, xz, wq, ws, wz, ys, yz)
  y = DequantizeLinear(cq, ys, yz)
}""", {"xs": np.array(0.02, np.float32), "xz": np.array(128, np.uint8),
       "wq": _rng().integers(-100, 100, (4, 3, 3, 3)).astype(np.int8), "ws": np.array(0.005, np.float32),
       "wz": np.array(0, np.int8), "ys": np.array(0.05, np.float32), "yz": np.array(128, np.uint8)})


def int8_weight_only(_):
    return text_model("""
<ir_version: 8, opset_import: ["" : 13]>
g (float[1,16] x) => (float[1,8] y) {
  wd = DequantizeLinear <axis = 1> (wq, ws, wz)
  y = MatMul(x, wd)
}""", {"wq": _rng().integers(-100, 100, (16, 8)).astype(np.int8), "ws": np.full(8, 0.01, np.float32),
       "wz": np.zeros(8, np.int8)})


# --- convolutions ---------------------------------------------------------------------------------------------

def conv1d(_):
    return text_model("""
<ir_version: 8, opset_import: ["" : 13]>
g (float[1,4,16] x) => (float[1,8,16] y) {
  c = Conv <pads = [1, 1]> (x, w, b)
  n = BatchNormalization(c, gamma, beta, mean, var)
  r = Relu(n)
  y = Conv <pads = [1, 1]> (r, w2)
}""", {"w": (8, 4, 3), "b": (8,), "gamma": np.full(8, 1.2, np.float32), "beta": np.full(8, 0.1, np.float32),
       "mean": np.zeros(8, np.float32), "var": np.ones(8, np.float32), "w2": (8, 8, 3)})


def conv3d(_):
    return text_model("""
<ir_version: 8, opset_import: ["" : 13]>
g (float[1,2,4,6,6] x) => (float[1,4,4,6,6] y) {
  c = Conv <pads = [1, 1, 1, 1, 1, 1]> (x, w, b)
  n = BatchNormalization(c, gamma, beta, mean, var)
  r = Relu(n)
  y = Conv <pads = [1, 1, 1, 1, 1, 1]> (r, w2)
}""", {"w": (4, 2, 3, 3, 3), "b": (4,), "gamma": np.full(4, 1.2, np.float32), "beta": np.full(4, 0.1, np.float32),
       "mean": np.zeros(4, np.float32), "var": np.ones(4, np.float32), "w2": (4, 4, 3, 3, 3)})


def grouped_and_depthwise(_):
    return text_model("""
<ir_version: 8, opset_import: ["" : 13]>
g (float[1,4,8,8] x) => (float[1,8,8,8] y) {
  d = Conv <group = 4, pads = [1, 1, 1, 1]> (x, wd, bd)
  r = Relu(d)
  y = Conv <group = 2, pads = [1, 1, 1, 1]> (r, wg)
}""", {"wd": (4, 1, 3, 3), "bd": (4,), "wg": (8, 2, 3, 3)})


def conv_transpose(_):
    return text_model("""
<ir_version: 8, opset_import: ["" : 13]>
g (float[1,4,4,4] x) => (float[1,2,8,8] y) {
  c = ConvTranspose <strides = [2, 2], pads = [1, 1, 1, 1], output_padding = [1, 1]> (x, w, b)
  n = BatchNormalization(c, gamma, beta, mean, var)
  y = Relu(n)
}""", {"w": (4, 2, 3, 3), "b": (2,), "gamma": np.full(2, 0.8, np.float32), "beta": np.full(2, 0.1, np.float32),
       "mean": np.zeros(2, np.float32), "var": np.ones(2, np.float32)})


def conv_transpose_grouped(_):
    return text_model("""
<ir_version: 8, opset_import: ["" : 13]>
g (float[1,4,4,4] x) => (float[1,4,8,8] y) {
  y = ConvTranspose <strides = [2, 2], group = 2, kernel_shape = [2, 2]> (x, w)
}""", {"w": (4, 2, 2, 2)})


def conv_auto_pad_dilated(_):
    return text_model("""
<ir_version: 8, opset_import: ["" : 13]>
g (float[1,3,9,9] x) => (float[1,4,5,5] y) {
  c = Conv <auto_pad = "SAME_UPPER", strides = [2, 2]> (x, w)
  r = Relu(c)
  y = Conv <dilations = [2, 2], pads = [2, 2, 2, 2]> (r, w2)
}""", {"w": (4, 3, 3, 3), "w2": (4, 4, 3, 3)})


def conv_constant_node_weight(_):
    w = numpy_helper.from_array((_rng().standard_normal((4, 3, 1, 1)) * 0.5).astype(np.float32), "wv")
    model = text_model("""
<ir_version: 8, opset_import: ["" : 13]>
g (float[1,3,8,8] x) => (float[1,4,8,8] y) {
  y = Conv(x, w)
}""")
    model.graph.node.insert(0, helper.make_node("Constant", [], ["w"], value=w))
    return model


def shared_weight(_):
    return text_model("""
<ir_version: 8, opset_import: ["" : 13]>
g (float[1,4,8,8] x) => (float[1,4,8,8] y) {
  a = Conv <pads = [1, 1, 1, 1]> (x, w)
  r = Relu(a)
  y = Conv <pads = [1, 1, 1, 1]> (r, w)
}""", {"w": (4, 4, 3, 3)})


def nhwc_transpose_first(_):
    return text_model("""
<ir_version: 8, opset_import: ["" : 13]>
g (float[1,8,8,3] x) => (float[1,8,8,4] y) {
  t = Transpose <perm = [0, 3, 1, 2]> (x)
  c = Conv <pads = [1, 1, 1, 1]> (t, w, b)
  r = Relu(c)
  y = Transpose <perm = [0, 2, 3, 1]> (r)
}""", {"w": (4, 3, 3, 3), "b": (4,)})


def bn_not_after_conv(_):
    return text_model("""
<ir_version: 8, opset_import: ["" : 13]>
g (float[1,4,8,8] x) => (float[1,4,8,8] y) {
  n = BatchNormalization(x, gamma, beta, mean, var)
  a = Add(n, x)
  m = BatchNormalization(a, gamma, beta, mean, var)
  y = Relu(m)
}""", {"gamma": np.array([1.0, 2.0, 0.5, 1.0], np.float32), "beta": np.full(4, 0.1, np.float32),
       "mean": np.array([0.0, 0.1, -0.1, 0.2], np.float32), "var": np.array([1.0, 2.0, 0.5, 1.0], np.float32)})


# --- linear layers ----------------------------------------------------------------------------------------------

def gemm_trans_b(_):
    return text_model("""
<ir_version: 8, opset_import: ["" : 13]>
g (float[2,8] x) => (float[2,4] y) {
  y = Gemm <transB = 1, alpha = 0.5, beta = 2.0> (x, w, b)
}""", {"w": (4, 8), "b": (4,)})


def classifier_flatten_gemm(_):
    return text_model("""
<ir_version: 8, opset_import: ["" : 11]>
g (float[1,3,8,8] x) => (float[1,5] y) {
  c = Conv <pads = [1, 1, 1, 1], strides = [2, 2]> (x, w)
  r = Relu(c)
  p = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (r)
  a = AveragePool <kernel_shape = [2, 2]> (p)
  f = Flatten <axis = 1> (a)
  g2 = Gemm <transB = 1> (f, fc, fb)
  y = Softmax <axis = 1> (g2)
}""", {"w": (4, 3, 3, 3), "fc": (5, 4), "fb": (5,)})


def matmul_const_weight_3d(_):
    return text_model("""
<ir_version: 8, opset_import: ["" : 13]>
g (float[2,4,8] x) => (float[2,4,6] y) {
  m = MatMul(x, w)
  y = Add(m, b)
}""", {"w": (8, 6), "b": (6,)})


def attention_block(_):
    return text_model("""
<ir_version: 8, opset_import: ["" : 13]>
g (float[1,4,8] x) => (float[1,4,8] y) {
  q = MatMul(x, wq)
  k = MatMul(x, wk)
  v = MatMul(x, wv)
  kt = Transpose <perm = [0, 2, 1]> (k)
  s = MatMul(q, kt)
  ss = Mul(s, scale)
  p = Softmax <axis = -1> (ss)
  o = MatMul(p, v)
  r = Add(o, x)
  mu = ReduceMean <axes = [-1]> (r)
  d = Sub(r, mu)
  d2 = Mul(d, d)
  va = ReduceMean <axes = [-1]> (d2)
  ve = Add(va, eps)
  sd = Sqrt(ve)
  nrm = Div(d, sd)
  ga = Mul(nrm, gamma)
  y = Add(ga, beta)
}""", {"wq": (8, 8), "wk": (8, 8), "wv": (8, 8), "scale": np.array(0.35, np.float32),
       "eps": np.array(1e-5, np.float32), "gamma": np.ones(8, np.float32), "beta": np.zeros(8, np.float32)})


def einsum_gelu_erf(_):
    return text_model("""
<ir_version: 8, opset_import: ["" : 13]>
g (float[1,4,8] x) => (float[1,4,8] y) {
  m = Einsum <equation = "bij,jk->bik"> (x, w)
  h = Div(m, sqrt2)
  e = Erf(h)
  e1 = Add(e, one)
  g2 = Mul(m, e1)
  y = Mul(g2, half)
}""", {"w": (8, 8), "sqrt2": np.array(1.4142135, np.float32), "one": np.array(1.0, np.float32),
       "half": np.array(0.5, np.float32)})


# --- graph shapes -------------------------------------------------------------------------------------------------

def dynamic_shapes(_):
    return text_model("""
<ir_version: 8, opset_import: ["" : 13]>
g (float[N,3,H,W] x) => (float[N,4,H,W] y) {
  c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
  y = Relu(c)
}""", {"w": (4, 3, 3, 3), "b": (4,)})


def duplicate_and_empty_node_names(_):
    model = text_model("""
<ir_version: 8, opset_import: ["" : 13]>
g (float[1,4,8,8] x) => (float[1,4,8,8] y) {
  a = Conv <pads = [1, 1, 1, 1]> (x, w)
  b = Relu(a)
  c = Conv <pads = [1, 1, 1, 1]> (b, w2)
  y = Relu(c)
}""", {"w": (4, 4, 3, 3), "w2": (4, 4, 3, 3)})
    for node, name in zip(model.graph.node, ["conv", "conv", "", ""]):
        node.name = name
    return model


def unused_initializers_and_input(_):
    return text_model("""
<ir_version: 8, opset_import: ["" : 13]>
g (float[1,3,8,8] x, float[1,2] unused) => (float[1,4,8,8] y) {
  y = Conv <pads = [1, 1, 1, 1]> (x, w)
}""", {"w": (4, 3, 3, 3), "stale": (16, 16), "stale_bias": (7,)})


def multiple_outputs(_):
    return text_model("""
<ir_version: 8, opset_import: ["" : 13]>
g (float[1,3,8,8] x) => (float[1,4,8,8] r, float[1,4,8,8] s, float[1,4,1,1] p) {
  c = Conv <pads = [1, 1, 1, 1]> (x, w)
  r = Relu(c)
  s = Sigmoid(c)
  p = GlobalAveragePool(r)
}""", {"w": (4, 3, 3, 3)})


def output_is_input(_):
    return text_model("""
<ir_version: 8, opset_import: ["" : 13]>
g (float[1,3,8,8] x) => (float[1,4,8,8] y, float[1,3,8,8] x) {
  c = Conv <pads = [1, 1, 1, 1]> (x, w)
  y = Relu(c)
}""", {"w": (4, 3, 3, 3)})


def output_is_initializer(_):
    return text_model("""
<ir_version: 8, opset_import: ["" : 13]>
g (float[1,3,8,8] x) => (float[1,4,8,8] y, float[4] b) {
  c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
  y = Relu(c)
}""", {"w": (4, 3, 3, 3), "b": (4,)})


def constant_only_graph(_):
    return text_model("""
<ir_version: 8, opset_import: ["" : 13]>
g () => (float[2,4] y) {
  m = MatMul(a, w)
  y = Relu(m)
}""", {"a": (2, 8), "w": (8, 4)})


def split_concat(_):
    return text_model("""
<ir_version: 8, opset_import: ["" : 13]>
g (float[1,8,8,8] x) => (float[1,8,8,8] y) {
  p, q = Split <axis = 1> (x, sizes)
  a = Conv <pads = [1, 1, 1, 1]> (p, wa)
  b = Conv <pads = [1, 1, 1, 1]> (q, wb)
  r = Relu(b)
  y = Concat <axis = 1> (a, r)
}""", {"sizes": np.array([3, 5], np.int64), "wa": (3, 3, 3, 3), "wb": (5, 5, 3, 3)})


def colon_input_name(_):
    return text_model("""
<ir_version: 8, opset_import: ["" : 13]>
g (float[1,3,8,8] "input:0") => (float[1,4,8,8] "output:0") {
  c = Conv <pads = [1, 1, 1, 1]> ("input:0", w)
  "output:0" = Relu(c)
}""", {"w": (4, 3, 3, 3)})


def path_like_tensor_names(_):
    # PyTorch names tensors like files; a printer or dump must not treat them as paths.
    return text_model("""
<ir_version: 8, opset_import: ["" : 13]>
g (float[1,3,8,8] "../x y") => (float[1,4,8,8] "/out/Relu_output_0") {
  "/conv/Conv_output_0" = Conv <pads = [1, 1, 1, 1]> ("../x y", "model.conv.weight")
  "/out/Relu_output_0" = Relu("/conv/Conv_output_0")
}""", {"model.conv.weight": (4, 3, 3, 3)})


def swish_hardswish_se(_):
    return text_model("""
<ir_version: 8, opset_import: ["" : 13]>
g (float[1,4,8,8] x) => (float[1,4,8,8] y) {
  c = Conv <pads = [1, 1, 1, 1]> (x, w)
  s = Sigmoid(c)
  sw = Mul(c, s)
  h = HardSigmoid <alpha = 0.1666667, beta = 0.5> (sw)
  hs = Mul(sw, h)
  p = GlobalAveragePool(hs)
  f = Conv(p, wf)
  fr = Relu(f)
  f2 = Conv(fr, wf2)
  gate = HardSigmoid(f2)
  y = Mul(hs, gate)
}""", {"w": (4, 4, 3, 3), "wf": (2, 4, 1, 1), "wf2": (4, 2, 1, 1)})


def pad_reflect_and_clip(_):
    return text_model("""
<ir_version: 8, opset_import: ["" : 13]>
g (float[1,3,8,8] x) => (float[1,4,8,8] y) {
  p = Pad <mode = "reflect"> (x, pads)
  c = Conv(p, w)
  y = Clip(c, lo, hi)
}""", {"pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "w": (4, 3, 3, 3),
       "lo": np.array(0.0, np.float32), "hi": np.array(6.0, np.float32)})


def reshape_expand_tile(_):
    return text_model("""
<ir_version: 8, opset_import: ["" : 13]>
g (float[1,8] x) => (float[2,4,4] y) {
  m = MatMul(x, w)
  r = Reshape(m, shape)
  e = Expand(r, eshape)
  y = Tile(e, reps)
}""", {"w": (8, 8), "shape": np.array([1, 2, 4], np.int64), "eshape": np.array([2, 2, 4], np.int64),
       "reps": np.array([1, 2, 1], np.int64)})


def local_function(_):
    text = """
<ir_version: 8, opset_import: ["" : 13, "local" : 1]>
g (float[1,8] x) => (float[1,8] y) {
  m = MatMul(x, w)
  y = local.Swish(m)
}
<domain: "local", opset_import: ["" : 13]>
Swish (a) => (b) {
  s = Sigmoid(a)
  b = Mul(a, s)
}"""
    return text_model(text, {"w": (8, 8)})


def batch_two_topk(_):
    return text_model("""
<ir_version: 8, opset_import: ["" : 13]>
g (float[2,16] x) => (float[2,3] v, int64[2,3] i) {
  m = MatMul(x, w)
  v, i = TopK <axis = 1> (m, k)
}""", {"w": (16, 8), "k": np.array([3], np.int64)})


def large_chain(_, count: int = 2500):
    """``count`` Conv+Relu pairs (5,000 nodes) on a 1x4x4x4 input."""
    rng = _rng(1)
    nodes, inits, prev = [], [], "x"
    for i in range(count):
        inits.append(numpy_helper.from_array((rng.standard_normal((4, 4, 1, 1)) * 0.5 + np.eye(4)[:, :, None, None]
                                              ).astype(np.float32) / 1.5, f"w{i}"))
        nodes.append(helper.make_node("Conv", [prev, f"w{i}"], [f"c{i}"], name=f"conv{i}"))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"))
        prev = f"r{i}"
    nodes.append(helper.make_node("Identity", [prev], ["y"]))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, (1, 4, 4, 4))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, (1, 4, 4, 4))], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def large_weights(_):
    """34 Conv 3x3 512 -> 512 + Relu: 321 MB of float32 weights, for memory and time on a large file."""
    from tests.large_models import conv_relu_chain
    return conv_relu_chain(34, channels=512)


# --- more shapes of real exports ------------------------------------------------------------------------------

def conv_weight_as_input(_):
    # The weight arrives at run time: nothing to fold, equalize or quantize per channel ahead of time.
    return text_model("""
<ir_version: 8, opset_import: ["" : 13]>
g (float[1,3,8,8] x, float[4,3,3,3] w) => (float[1,4,8,8] y) {
  c = Conv <pads = [1, 1, 1, 1]> (x, w)
  y = Relu(c)
}""")


def weight_first_matmul_transa_gemm(_):
    return text_model("""
<ir_version: 8, opset_import: ["" : 13]>
g (float[8,2] x) => (float[2,4] y) {
  m = MatMul(w, x)
  y = Gemm <transA = 1> (m, w2)
}""", {"w": (8, 8), "w2": (8, 4)})


def conv_affine_chain(_):
    # Per-channel Mul and Add after a grouped Conv, then Div and Sub by scalars (fold-affine's shapes).
    return text_model("""
<ir_version: 8, opset_import: ["" : 13]>
g (float[1,4,8,8] x) => (float[1,4,8,8] y) {
  c = Conv <group = 2, pads = [1, 1, 1, 1]> (x, w)
  m = Mul(c, s)
  a = Add(m, b)
  d = Div(a, k)
  e = Sub(k, d)
  y = PRelu(e, slope)
}""", {"w": (4, 2, 3, 3), "s": np.array([1.0, -2.0, 0.5, 3.0], np.float32).reshape(1, 4, 1, 1),
       "b": np.array([0.1, 0.2, -0.3, 0.0], np.float32).reshape(1, 4, 1, 1), "k": np.array(2.0, np.float32),
       "slope": np.full((4, 1, 1), 0.25, np.float32)})


def norms(_):
    return text_model("""
<ir_version: 10, opset_import: ["" : 21]>
g (float[1,4,8,8] x) => (float[1,4,8,8] y) {
  c = Conv <pads = [1, 1, 1, 1]> (x, w)
  i = InstanceNormalization(c, gamma, beta)
  r = Relu(i)
  y = GroupNormalization <num_groups = 2> (r, gamma, beta)
}""", {"w": (4, 4, 3, 3), "gamma": np.full(4, 1.5, np.float32), "beta": np.full(4, 0.1, np.float32)})


def lstm(_):
    return text_model("""
<ir_version: 8, opset_import: ["" : 13]>
g (float[5,1,4] x) => (float[5,1,1,8] y, float[1,1,8] h) {
  y, h = LSTM <hidden_size = 8> (x, w, r)
}""", {"w": (1, 32, 4), "r": (1, 32, 8)})


def squeeze_unsqueeze_opset11(_):
    return text_model("""
<ir_version: 6, opset_import: ["" : 11]>
g (float[1,3,8,8] x) => (float[1,4] y) {
  c = Conv <pads = [1, 1, 1, 1]> (x, w)
  p = GlobalAveragePool(c)
  q = Squeeze <axes = [2, 3]> (p)
  u = Unsqueeze <axes = [2]> (q)
  y = ReduceMax <axes = [2], keepdims = 0> (u)
}""", {"w": (4, 3, 3, 3)})


def concat_self_and_input(_):
    return text_model("""
<ir_version: 8, opset_import: ["" : 13]>
g (float[1,3,8,8] x) => (float[1,26,8,8] y) {
  c = Conv <pads = [1, 1, 1, 1]> (x, w)
  y = Concat <axis = 1> (c, c, x, x, x, x, x, x)
}""", {"w": (4, 3, 3, 3)})


def tiny_spatial(_):
    return text_model("""
<ir_version: 8, opset_import: ["" : 13]>
g (float[1,3,1,1] x) => (float[1,4,1,1] y) {
  c = Conv(x, w, b)
  n = BatchNormalization(c, gamma, beta, mean, var)
  y = Sigmoid(n)
}""", {"w": (4, 3, 1, 1), "b": (4,), "gamma": np.ones(4, np.float32), "beta": np.zeros(4, np.float32),
       "mean": np.zeros(4, np.float32), "var": np.ones(4, np.float32)})


def constant_node_values(_):
    return text_model("""
<ir_version: 8, opset_import: ["" : 13]>
g (float[1,8] x) => (float[1,8] y) {
  k = Constant <value_float = 0.5> ()
  sh = Constant <value_ints = [1, 8]> ()
  m = MatMul(x, w)
  r = Reshape(m, sh)
  y = Mul(r, k)
}""", {"w": (8, 8)})


def external_data_subfolder(folder):
    return _external(folder, keep_data=True, location="data/weights.bin")


def external_data_escapes(folder):
    # A location outside the model's folder: onnx refuses to read it, and so must qcc, naming the file.
    (folder / "inner").mkdir()
    path = _external(folder, keep_data=True, location="weights.bin")
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../weights.bin"
    inner = folder / "inner" / "ext.onnx"
    onnx.save_model(model, inner)
    path.unlink()
    return inner


def _token_ids(rng):
    return {"ids": rng.integers(0, 10, (1, 6)).astype(np.int64)}


def _denormal_samples(rng):
    return {"x": (rng.standard_normal((1, 3, 8, 8)) * 1e-40).astype(np.float32)}



CASES = {
    # the list
    "contrib_gelu": Case(contrib_gelu, all_ok()),
    "custom_domain_op": Case(custom_domain_op, compiles_refused(r"Frobnicate")),
    # an empty weight computes nothing a quantizer or a rewrite could keep: refused when compiled, printed as it is
    "conv_zero_size_weight": Case(conv_zero_size_weight, compiles_refused(named("w"))),
    # onnxruntime's CPU kernels have no bfloat16 Conv: no target can run or calibrate it as it is
    "bfloat16_model": Case(bfloat16_model, all_refused(r"bfloat16")),
    "conv_int32_weight": Case(conv_int32_weight, compiles_refused(named("w"))),
    "graph_input_with_initializer": Case(graph_input_with_initializer, all_ok()),
    # float rewrites keep the model's float type; quantizing starts from float32 models only, said before any pass
    "float16_model": Case(float16_model, all_ok(htp=refuse(r"'x' is float16"))),
    "float64_model": Case(float64_model, all_ok(htp=refuse(r"'x' is float64"))),
    "nan_weight": Case(nan_weight, compiles_refused(named("w"))),
    "inf_weight": Case(inf_weight, compiles_refused(named("b"))),
    "nan_bn_variance": Case(nan_bn_variance, compiles_refused(named("var"))),
    "denormal_calibration": Case(lambda _: conv_relu(), all_ok(), sample=_denormal_samples),
    # opsets 7-23, IR 3-10
    "opset7_ir3": Case(opset7_ir3, all_ok()),
    "opset6": Case(opset6, all_refused(r"opset 6")),
    "opset7_upsample_attr": Case(opset7_upsample_attr, all_ok()),
    "opset8_clip_attrs": Case(opset8_clip_attrs, all_ok()),
    "opset9_upsample_bn": Case(opset9_upsample_bn, all_ok()),
    "opset10_resize": Case(opset10_resize, all_ok()),
    "opset11_resize_linear": Case(opset11_resize_linear, all_ok()),
    "opset17_layernorm": Case(opset17_layernorm, all_ok()),
    "opset18_reduce_axes_input": Case(opset18_reduce_axes_input, all_ok()),
    "ir9_opset19": Case(ir9_opset19, all_ok()),
    "opset21_ir10": Case(opset21_ir10, all_ok()),
    "opset23_ir10": Case(opset23_ir10, all_ok()),
    "opset_future": Case(opset_future, all_refused(r"opset 99")),
    # external data
    "external_data": Case(external_data, all_ok()),
    "external_data_missing": Case(external_data_missing, all_refused(r"weights\.bin")),
    # subgraphs: control flow is refused, naming the node
    "if_subgraph": Case(if_subgraph, all_refused(r"\(If\)")),
    "loop_subgraph": Case(loop_subgraph, all_refused(r"\(Loop\)")),
    "local_function": Case(local_function, all_ok()),
    # dtypes
    "int8_input_cast": Case(int8_input_cast, all_ok()),
    "int64_tokens_gather": Case(int64_tokens_gather, all_ok(), sample=_token_ids),
    "bool_input_where": Case(bool_input_where, all_ok()),
    "scalar_input": Case(scalar_input, all_ok()),
    "argmax_int64_output": Case(argmax_int64_output, all_ok()),
    # already quantized
    "qdq_model": Case(qdq_model, all_ok()),
    "qlinearconv_model": Case(qlinearconv_model, all_ok()),
    "int8_weight_only": Case(int8_weight_only, all_ok()),
    # convolutions
    "conv1d": Case(conv1d, all_ok()),
    "conv3d": Case(conv3d, all_ok()),
    "grouped_and_depthwise": Case(grouped_and_depthwise, all_ok()),
    "conv_transpose": Case(conv_transpose, all_ok()),
    "conv_transpose_grouped": Case(conv_transpose_grouped, all_ok()),
    "conv_auto_pad_dilated": Case(conv_auto_pad_dilated, all_ok()),
    "conv_constant_node_weight": Case(conv_constant_node_weight, all_ok()),
    "shared_weight": Case(shared_weight, all_ok()),
    "nhwc_transpose_first": Case(nhwc_transpose_first, all_ok()),
    "bn_not_after_conv": Case(bn_not_after_conv, all_ok()),
    # linear layers and blocks
    "gemm_trans_b": Case(gemm_trans_b, all_ok()),
    "classifier_flatten_gemm": Case(classifier_flatten_gemm, all_ok()),
    "matmul_const_weight_3d": Case(matmul_const_weight_3d, all_ok()),
    "attention_block": Case(attention_block, all_ok()),
    "einsum_gelu_erf": Case(einsum_gelu_erf, all_ok()),
    "swish_hardswish_se": Case(swish_hardswish_se, all_ok()),
    # graph shapes and names
    "dynamic_shapes": Case(dynamic_shapes, all_ok()),
    "dynamic_shapes_fixed": Case(dynamic_shapes, all_ok(), input_shapes=("x:1,3,8,8",)),
    "duplicate_and_empty_node_names": Case(duplicate_and_empty_node_names, all_ok()),
    "unused_initializers_and_input": Case(unused_initializers_and_input, all_ok()),
    "multiple_outputs": Case(multiple_outputs, all_ok()),
    "output_is_input": Case(output_is_input, all_ok()),
    "output_is_initializer": Case(output_is_initializer, all_ok()),
    "constant_only_graph": Case(constant_only_graph, all_ok()),
    "split_concat": Case(split_concat, all_ok()),
    "colon_input_name": Case(colon_input_name, all_ok(), input_shapes=("input:0:1,3,8,8",)),
    "path_like_tensor_names": Case(path_like_tensor_names, all_ok()),
    "pad_reflect_and_clip": Case(pad_reflect_and_clip, all_ok()),
    "reshape_expand_tile": Case(reshape_expand_tile, all_ok()),
    "batch_two_topk": Case(batch_two_topk, all_ok()),
    # more shapes of real exports
    "conv_weight_as_input": Case(conv_weight_as_input, all_ok()),
    "weight_first_matmul_transa_gemm": Case(weight_first_matmul_transa_gemm, all_ok()),
    "conv_affine_chain": Case(conv_affine_chain, all_ok()),
    "norms": Case(norms, all_ok()),
    "lstm": Case(lstm, all_ok()),
    "squeeze_unsqueeze_opset11": Case(squeeze_unsqueeze_opset11, all_ok()),
    "concat_self_and_input": Case(concat_self_and_input, all_ok()),
    "tiny_spatial": Case(tiny_spatial, all_ok()),
    "constant_node_values": Case(constant_node_values, all_ok()),
    "external_data_subfolder": Case(external_data_subfolder, all_ok()),
    "external_data_escapes": Case(external_data_escapes, all_refused(r"weights\.bin")),
    **{f"conv_relu_opset{opset}_ir{ir}": Case(lambda _, opset=opset, ir=ir: conv_relu(opset=opset, ir=ir), all_ok())
       for opset, ir in ((12, 7), (14, 7), (15, 8), (16, 8), (20, 9), (22, 10))},
    "large_chain_5000_nodes": Case(large_chain, all_ok(), slow=True),
    "large_weights_321mb": Case(large_weights, all_ok(), slow=True),
}
