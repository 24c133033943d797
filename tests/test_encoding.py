"""compiler/encoding.py: TF-style encodings, fixed ranges, and one test per shared-encoding table row."""
import numpy as np
import onnx.parser
import pytest

from compiler.encoding import (SHARED_ENCODING_OPS, Encoding, activation_encoding, bias_encoding, clip_bounds,
                               fake_quantize, op_fixed_range, range_encoding, stored_values, union_encoding,
                               weight_encoding)
from compiler.ir import from_onnx, infer_shapes
from compiler.pass_manager import PassContext, PassManager, parse_pipeline
from compiler.runtime import sample_inputs


@pytest.mark.parametrize("lo, hi, bw", [(-1.3, 2.7, 8), (0.0, 6.0, 8), (0.2, 0.9, 8), (-5.0, -1.0, 16), (0.0, 0.001, 8)])
def test_activation_encoding_contains_zero_exactly(lo, hi, bw):
    enc = activation_encoding(lo, hi, bw)
    assert enc.offset[0] <= 0 and float(enc.max[0]) - float(enc.min[0]) >= 0.01 - 1e-9
    assert float(enc.min[0]) <= min(lo, 0.0) + enc.scale[0] and float(enc.max[0]) >= max(hi, 0.0) - enc.scale[0]
    assert fake_quantize(np.zeros(3, np.float32), enc).tolist() == [0.0, 0.0, 0.0]


def test_weight_encoding_zero_channel_gets_valid_scale():
    w = np.zeros((3, 2, 1, 1), np.float32)
    w[0] = 0.5
    w[2] = -1.27
    enc = weight_encoding(w, 8, axis=0)
    assert enc.symmetric and enc.offset == (-128, -128, -128)
    assert all(s > 0 for s in enc.scale)
    assert enc.scale[2] == pytest.approx(1.27 / 127)
    assert fake_quantize(w, enc)[1].tolist() == [[[0.0]], [[0.0]]]


def test_weight_encoding_keeps_tiny_channels_fine_grained():
    # det's output-head filters have |w| ~ 2e-4: the activation floor of 0.01 left them ~5 levels
    w = np.linspace(-2e-4, 2e-4, 16, dtype=np.float32).reshape(1, 16, 1, 1)
    enc = weight_encoding(w, 8, axis=0)
    assert enc.scale[0] == pytest.approx(2e-4 / 127)
    assert len(np.unique(fake_quantize(w, enc))) == 16
    assert np.abs(fake_quantize(w, enc) - w).max() <= enc.scale[0] / 2 + 1e-12


def test_weight_encoding_treats_denormal_channels_as_zero():
    # PP-OCR rec's Gemm channels of |w| ~ 3e-40: their own scale (~2.5e-42) times a 16-bit input scale
    # underflowed the int32 bias scale to 0 in float32.
    w = np.array([[3e-40, -2e-40], [0.5, -0.25]], np.float32)
    enc = weight_encoding(w, 8, axis=0)
    assert enc.scale[0] == weight_encoding(np.zeros((1, 2), np.float32), 8, axis=0).scale[0]
    assert fake_quantize(w, enc)[0].tolist() == [0.0, 0.0]
    assert all(s > 0 for s in bias_encoding(1.5e-7, enc).scale)  # 16-bit steps of a 0.01-wide range


def test_bias_encoding_scale_is_input_times_weight():
    weight = Encoding(bw=8, scale=(0.5, 0.25), offset=(-128, -128), symmetric=True, axis=0)
    bias = bias_encoding(0.1, weight)
    assert bias.bw == 32 and bias.scale == pytest.approx((0.05, 0.025)) and bias.axis == 0


def test_range_encoding_uses_qnn_grids_at_16_bits():
    assert range_encoding(0.0, 1.0, 16) == Encoding(bw=16, scale=(2.0 ** -16,), offset=(0,))
    assert range_encoding(-1.0, 1.0, 16) == Encoding(bw=16, scale=(2.0 ** -15,), offset=(-32768,))
    assert range_encoding(0.0, 1.0, 8) == activation_encoding(0.0, 1.0, 8)
    assert range_encoding(0.0, 6.0, 16) == activation_encoding(0.0, 6.0, 16)


def test_union_encoding_covers_all_and_takes_widest_bits():
    a, b = activation_encoding(-1.0, 2.0, 8), activation_encoding(0.0, 5.0, 16)
    union = union_encoding([a, b])
    assert union.bw == 16 and float(union.min[0]) <= -1.0 + 1e-4 and float(union.max[0]) >= 5.0 - 1e-4


def _graph(body: str, inits: str = "", inputs: str = "float[1,4,4,4] x", opset: int = 13):
    """A model running ``body`` (which defines y) and summing y into a scalar output."""
    text = (f'<ir_version: 8, opset_import: ["" : {opset}]>\ng ({inputs}) => (float out) <{inits}> {{\n{body}\n'
            f'out = ReduceSum <keepdims = 0> (y)\n}}')
    if not inits:
        text = text.replace(" <>", "")
    return from_onnx(infer_shapes(onnx.parser.parse_model(text)))


def test_clip_bounds_from_inputs_and_attributes():
    module = _graph("y = Clip(x, lo, hi)", "float lo = {0.0}, float hi = {6.0}")
    assert clip_bounds(module.graph.nodes[0]) == (0.0, 6.0)
    old = _graph("y = Clip <min = 0.0, max = 1.0> (x)", opset=10)
    assert clip_bounds(old.graph.nodes[0]) == (0.0, 1.0) and op_fixed_range(old.graph.nodes[0]) == (0.0, 1.0)
    relu6 = _graph("y = Clip(x, lo, hi)", "float lo = {0.0}, float hi = {6.0}")
    assert op_fixed_range(relu6.graph.nodes[0]) is None


# One model per SHARED_ENCODING_OPS row: (body, initializers, tensors that must share one encoding).
SHARED_CASES = {
    "MaxPool": ("y = MaxPool <kernel_shape = [2, 2]> (x)", "", ["x", "y"]),
    "GlobalMaxPool": ("y = GlobalMaxPool(x)", "", ["x", "y"]),
    "Reshape": ("y = Reshape(x, s)", "int64[2] s = {1, 64}", ["x", "y"]),
    "Flatten": ("y = Flatten(x)", "", ["x", "y"]),
    "Transpose": ("y = Transpose <perm = [0, 2, 3, 1]> (x)", "", ["x", "y"]),
    "Squeeze": ("y = Squeeze(x, a)", "int64[1] a = {0}", ["x", "y"]),
    "Unsqueeze": ("y = Unsqueeze(x, a)", "int64[1] a = {0}", ["x", "y"]),
    "Slice": ("y = Slice(x, st, en, ax)", "int64[1] st = {1}, int64[1] en = {3}, int64[1] ax = {1}", ["x", "y"]),
    "Gather": ("y = Gather <axis = 1> (x, i)", "int64[2] i = {0, 2}", ["x", "y"]),
    "Expand": ("y = Expand(x, s)", "int64[4] s = {2, 4, 4, 4}", ["x", "y"]),
    "Tile": ("y = Tile(x, r)", "int64[4] r = {1, 1, 2, 1}", ["x", "y"]),
    "DepthToSpace": ("y = DepthToSpace <blocksize = 2> (x)", "", ["x", "y"]),
    "SpaceToDepth": ("y = SpaceToDepth <blocksize = 2> (x)", "", ["x", "y"]),
    "Identity": ("y = Identity(x)", "", ["x", "y"]),
    "Pad": ("y = Pad(x, p)", "int64[8] p = {0, 0, 1, 1, 0, 0, 1, 1}", ["x", "y"]),
    "Resize": ('y = Resize <mode = "nearest"> (x, , s)', "float[4] s = {1.0, 1.0, 2.0, 2.0}", ["x", "y"]),
    "Concat": ("z = Mul(x, k)\ny = Concat <axis = 1> (x, z)", "float k = {3.0}", ["x", "z", "y"]),
    "Split": ("a, b = Split <axis = 1> (x)\ny = Add(a, b)", "", ["x", "a", "b"]),
}


def test_every_table_row_has_a_case():
    assert set(SHARED_CASES) == set(SHARED_ENCODING_OPS)


@pytest.mark.parametrize("op", sorted(SHARED_CASES))
def test_shared_encoding_row(op):
    body, inits, members = SHARED_CASES[op]
    module = _graph(body, inits)
    ctx = PassContext(calib_data=sample_inputs(module, PassContext(seed=0), count=3), log=lambda m: None)
    PassManager(parse_pipeline("calibrate{method=minmax}"), quiet=True).run(module, ctx)
    calibrated = {name: module.encodings[name] for name in members}
    PassManager(parse_pipeline("propagate-encodings"), quiet=True).run(module, ctx)
    shared = {module.encodings[name] for name in members}
    assert len(shared) == 1, f"{op}: members {members} do not share one encoding"
    enc = shared.pop()
    step = enc.scale[0]  # keeping zero exact may move either end by up to one step
    for name, before in calibrated.items():
        assert float(enc.min[0]) <= float(before.min[0]) + step and float(enc.max[0]) >= float(before.max[0]) - step, \
            f"{op}: shared encoding does not cover {name}'s range"


@pytest.mark.parametrize("op, attrs", [("HardSwish", {}), ("HardSigmoid", {"alpha": 0.2, "beta": 0.5}),
                                       ("HardSigmoid", {"alpha": 1 / 6, "beta": 0.5}), ("Sigmoid", {}), ("Tanh", {})])
def test_saturation_bounds_leave_the_quantized_output_unchanged(op, attrs):
    from compiler.encoding import saturation_bounds

    class Node:
        pass
    node = Node()
    node.op, node.attrs = op, attrs
    lo, hi = saturation_bounds(node, 8)
    functions = {
        "HardSwish": lambda x: x * np.clip(x / 6 + 0.5, 0, 1),
        "HardSigmoid": lambda x: np.clip(attrs.get("alpha", 0.2) * x + attrs.get("beta", 0.5), 0, 1),
        "Sigmoid": lambda x: 1 / (1 + np.exp(-x)), "Tanh": np.tanh}
    f = functions[op]
    x = np.linspace(-50, 50, 100001)
    out = activation_encoding(-1.0 if op == "Tanh" else 0.0, 1.0, 8)
    if op == "HardSwish":
        np.testing.assert_array_equal(f(np.clip(x, lo, hi)), f(x))
    else:
        np.testing.assert_array_equal(fake_quantize(f(np.clip(x, lo, hi)), out), fake_quantize(f(x), out))


# y = a*x + b by one op with a scalar constant: (body, initializers, a, b).
AFFINE_CASES = {
    "Mul": ("y = Mul(x, k)", "float k = {0.63}", 0.63, 0.0),
    "Mul by a negative constant first": ("y = Mul(k, x)", "float k = {-1.7}", -1.7, 0.0),
    "Div": ("y = Div(x, k)", "float k = {4.0}", 0.25, 0.0),
    "Add": ("y = Add(x, k)", "float k = {-0.55}", 1.0, -0.55),
    "Sub": ("y = Sub(x, k)", "float k = {0.3}", 1.0, -0.3),
    "Sub from a constant": ("y = Sub(k, x)", "float k = {2.0}", -1.0, 2.0),
    "Neg": ("y = Neg(x)", "", -1.0, 0.0),
}


def _propagated(body: str, inits: str):
    """Calibrated and propagated, y calibrated to a grid of its own (min-max gives y = a*x + b x's grid mapped)."""
    module = _graph(body, inits)
    ctx = PassContext(calib_data=sample_inputs(module, PassContext(seed=0), count=3), log=lambda m: None)
    PassManager(parse_pipeline("calibrate{method=minmax}"), quiet=True).run(module, ctx)
    module.encodings["y"] = activation_encoding(float(module.encodings["y"].min[0]) * 0.9,
                                                float(module.encodings["y"].max[0]) * 0.9)
    calibrated = dict(module.encodings)
    PassManager(parse_pipeline("propagate-encodings"), quiet=True).run(module, ctx)
    return module, calibrated


@pytest.mark.parametrize("case", sorted(AFFINE_CASES))
def test_scalar_affine_output_moves_the_input_codes_without_rounding_them_again(case):
    body, inits, a, b = AFFINE_CASES[case]
    module, calibrated = _propagated(body, inits)
    x_enc, y_enc = module.encodings["x"], module.encodings["y"]
    assert y_enc != calibrated["y"]
    grid = (np.arange(2 ** x_enc.bw) + x_enc.offset[0]) * x_enc.scale[0]
    exact = a * grid + b
    error = fake_quantize(exact, y_enc) - exact
    step = y_enc.scale[0]
    # every code lands on one output code: the only error is b's distance to the grid, the same for all
    assert np.ptp(error) < 1e-4 * step and abs(error[0]) <= step / 2 + 1e-6
    assert y_enc.scale[0] == pytest.approx(abs(a) * x_enc.scale[0], rel=1e-6)


def test_scalar_affine_keeps_its_own_encoding_where_the_mapped_grid_would_not_hold_zero():
    module, calibrated = _propagated("r = Relu(x)\ny = Add(r, k)", "float k = {1.5}")
    assert module.encodings["y"] == calibrated["y"]


def test_scalar_affine_leaves_a_fused_activation_its_encoding():
    module, _ = _propagated("m = Add(x, k)\ny = Relu(m)", "float k = {-0.5}")
    assert module.encodings["m"] == module.encodings["y"]


def test_an_int32_bias_is_divided_as_quantize_linear_divides():
    # |b / s| past 2^24 (a channel with a tiny weight scale): float32 division, as QuantizeLinear (and so AIMET's
    # encodings_to_onnx_qdq) computes it, gives another integer than float64 would.
    scale, bias = np.float32(1.4348417e-08), np.array([0.83884734], dtype=np.float32)
    enc = Encoding(bw=32, scale=(float(scale),), offset=(-(2 ** 31),), symmetric=True)
    as_float64 = np.round(bias.astype(np.float64) / np.float64(scale))
    assert stored_values(bias, enc)[0] == np.round(bias / scale)[0] != as_float64[0]


def test_a_weight_is_divided_as_quantize_linear_divides_and_a_scalar_stays_an_array():
    # A weight within a float32 ulp of a half step: float64 division rounds it one way, QuantizeLinear's float32
    # division (and so a consumer applying the encodings file) the other.
    scale = np.float32(0.1)
    enc = Encoding(bw=8, scale=(float(scale),), offset=(-(2 ** 7),), symmetric=True)
    candidates = (np.arange(1, 200000, dtype=np.float32) * np.float32(1e-5)).astype(np.float32)
    as_float32 = np.round(candidates / scale)
    as_float64 = np.round(candidates.astype(np.float64) / np.float64(scale))
    differ = candidates[(as_float32 != as_float64) & (np.abs(as_float32) <= 127)]
    assert differ.size  # such weights exist
    np.testing.assert_array_equal(stored_values(differ, enc), np.round(differ / scale).astype(np.int8))
    scalar = stored_values(np.float32(0.3), activation_encoding(0.0, 1.0))
    assert isinstance(scalar, np.ndarray) and scalar.shape == () and scalar.dtype == np.uint8
