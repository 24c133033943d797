"""Qualcomm TF-style encodings, in one place (design.md §5).

Activations: asymmetric unsigned, min <= 0 <= max, range >= 0.01, zero exactly
representable: scale = (max - min) / (2^bw - 1), offset = round(min / scale),
then min/max are re-derived from scale and offset so they lie on the grid.
Weights: symmetric signed (offset = -2^(bw-1)), per channel or per tensor.
Bias: int32 with scale = s_in * s_w.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_RANGE = 0.01
# A weight channel whose largest |w| is below this contributes nothing at any activation scale; it is quantized
# as a zero channel (weight_encoding).
NEGLIGIBLE_WEIGHT = 1e-20


@dataclass(frozen=True)
class Encoding:
    """One encoding. Per-channel encodings hold tuples (one entry per channel) and an ``axis``.

    ``offset`` follows QNN/AIMET: q = round(x / scale) - offset, x = (q + offset) * scale;
    for unsigned asymmetric offset <= 0, for symmetric signed offset = -2^(bw-1).
    """
    bw: int
    scale: tuple
    offset: tuple
    symmetric: bool = False
    axis: int | None = None
    dtype: str = "int"  # "int" or "float" (float = keep fp16/fp32, no quantization)

    @property
    def per_channel(self) -> bool:
        return self.axis is not None

    @property
    def min(self) -> np.ndarray:
        return (np.asarray(self.offset, dtype=np.float64)) * np.asarray(self.scale, dtype=np.float64)

    @property
    def max(self) -> np.ndarray:
        levels = 2 ** self.bw - 1
        return (np.asarray(self.offset, dtype=np.float64) + levels) * np.asarray(self.scale, dtype=np.float64)

    def __str__(self) -> str:
        kind = "sym" if self.symmetric else "asym"
        if self.per_channel:
            scales = np.asarray(self.scale)
            return (f"bw={self.bw} {kind} axis={self.axis} channels={len(scales)} "
                    f"scale=[{scales.min():.6g}..{scales.max():.6g}] offset={self.offset[0]}")
        return f"bw={self.bw} {kind} scale={self.scale[0]:.6g} offset={self.offset[0]} min={self.min[0]:.6g} max={self.max[0]:.6g}"


def activation_encoding(vmin: float, vmax: float, bw: int = 8) -> Encoding:
    """Asymmetric unsigned encoding covering [vmin, vmax], widened to contain 0 and MIN_RANGE."""
    vmin, vmax = min(float(vmin), 0.0), max(float(vmax), 0.0)
    if vmax - vmin < MIN_RANGE:
        vmax = vmin + MIN_RANGE
    levels = 2 ** bw - 1
    scale = (vmax - vmin) / levels
    offset = int(np.round(vmin / scale))
    offset = min(max(offset, -levels), 0)
    return Encoding(bw=bw, scale=(float(np.float32(scale)),), offset=(offset,))


def symmetric_grid_encoding(vmin: float, vmax: float, bw: int = 8) -> Encoding:
    """An unsigned encoding on the symmetric grid covering [vmin, vmax]: scale = max|x| / (2^(bw-1) - 1),
    offset -2^(bw-1), codes k * scale for k in [-2^(bw-1), 2^(bw-1) - 1], AIMET's symmetric activation
    grid; stored unsigned (zero point 2^(bw-1)), as QNN's HTP takes activations. max|x| is at least
    MIN_RANGE / 2."""
    absmax = max(abs(float(vmin)), abs(float(vmax)), MIN_RANGE / 2)
    return Encoding(bw=bw, scale=(float(np.float32(absmax / (2 ** (bw - 1) - 1))),), offset=(-(2 ** (bw - 1)),))


def on_symmetric_grid(enc: Encoding) -> bool:
    """Whether an unsigned per-tensor encoding's codes are symmetric about zero (offset -2^(bw-1))."""
    return enc.dtype == "int" and not enc.symmetric and not enc.per_channel and enc.offset[0] == -(2 ** (enc.bw - 1))


# HTP (v73 to v81, measured on the QNN HTP backend) computes a 16-bit weight exactly only while |q| < 2^14: with
# codes up to 2^15 - 1 a W16A16 convolution lands up to 18 output steps off its QDQ model, with 2^14 - 1 within 2
# (det at W16A16: cosine 0.99898 on HTP v73 against 0.99996 simulated; docs/htp-backend.md).
HTP_WEIGHT16_LEVELS = 2 ** 14 - 1


def weight_levels(bw: int) -> int:
    """The largest |q| a symmetric weight of ``bw`` bits uses: 2^(bw-1) - 1, and HTP_WEIGHT16_LEVELS at 16 bits."""
    return HTP_WEIGHT16_LEVELS if bw == 16 else 2 ** (bw - 1) - 1


def weight_encoding(weights: np.ndarray, bw: int = 8, axis: int | None = 0) -> Encoding:
    """Symmetric signed encoding; per channel along ``axis`` (None for per tensor), on weight_levels(bw) steps
    each side of zero.

    A channel whose weights are all zero (padded channels) gets the minimum range,
    so its scale is valid and its values quantize to exactly zero. Other channels keep
    their own range however small: the 0.01 floor is an activation rule, and applied to
    weights it left det's tiny output-head filters (|w| ~ 2e-4) about five levels.
    Weights below NEGLIGIBLE_WEIGHT count as zero: PP-OCR rec has Gemm channels of
    denormal weights (|w| ~ 3e-40), whose scale times a 16-bit input scale underflows
    the int32 bias scale s_in * s_w to 0 in float32.
    """
    w = np.asarray(weights, dtype=np.float64)
    if axis is None:
        absmax = np.array([np.abs(w).max() if w.size else 0.0])
    else:
        absmax = np.abs(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)).max(axis=1)
    half = 2 ** (bw - 1)
    # Symmetric range [-absmax, absmax] with offset -2^(bw-1): scale = absmax / weight_levels(bw)
    absmax = np.where(absmax > NEGLIGIBLE_WEIGHT, absmax, MIN_RANGE / 2)
    scale = absmax / weight_levels(bw)
    return Encoding(bw=bw, scale=tuple(float(np.float32(s)) for s in scale),
                    offset=tuple(-half for _ in scale), symmetric=True, axis=axis)


def bias_encoding(input_scale: float, weight: Encoding) -> Encoding:
    scales = tuple(float(np.float32(input_scale * s)) for s in weight.scale)
    return Encoding(bw=32, scale=scales, offset=tuple(-(2 ** 31) for _ in scales), symmetric=True, axis=weight.axis)


def quantize(x: np.ndarray, enc: Encoding) -> np.ndarray:
    """Integer codes q in [0, 2^bw - 1] (before the signed shift of symmetric encodings)."""
    scale, offset = _broadcast(enc, x.ndim)
    return np.clip(np.round(x / scale) - offset, 0, 2 ** enc.bw - 1)


def fake_quantize(x: np.ndarray, enc: Encoding) -> np.ndarray:
    scale, offset = _broadcast(enc, x.ndim)
    return ((quantize(x, enc) + offset) * scale).astype(x.dtype)


def _broadcast(enc: Encoding, ndim: int):
    scale = np.asarray(enc.scale, dtype=np.float64)
    offset = np.asarray(enc.offset, dtype=np.float64)
    if enc.per_channel:
        shape = [1] * ndim
        shape[enc.axis] = -1
        return scale.reshape(shape), offset.reshape(shape)
    return scale[0], offset[0]


# --- Ranges fixed by the op ----------------------------------------------------------------------
# These outputs take the op's range whatever calibration saw: the range is a property of the op,
# and QNN expects it (at 16 bits QNN requires Sigmoid and Tanh outputs on the exact grids below).
FIXED_RANGE_OPS = {"Sigmoid": (0.0, 1.0), "HardSigmoid": (0.0, 1.0), "Softmax": (0.0, 1.0), "Tanh": (-1.0, 1.0)}


def clip_bounds(node) -> tuple[float, float] | None:
    """Constant (min, max) of a Clip (attributes before opset 11, inputs after); None if not constant."""
    from compiler.ir import const_value
    if "min" in node.attrs or "max" in node.attrs:
        return float(node.attrs.get("min", -np.inf)), float(node.attrs.get("max", np.inf))
    bounds = []
    for index, default in ((1, -np.inf), (2, np.inf)):
        if index < len(node.inputs) and node.inputs[index].name:
            value = const_value(node.inputs[index])
            if value is None:
                return None
            bounds.append(float(np.asarray(value).reshape(-1)[0]))
        else:
            bounds.append(default)
    return bounds[0], bounds[1]


def op_fixed_range(node) -> tuple[float, float] | None:
    """The output range ``node`` fixes: FIXED_RANGE_OPS, and Clip(0, 1)."""
    if node.op in FIXED_RANGE_OPS:
        return FIXED_RANGE_OPS[node.op]
    if node.op == "Clip" and clip_bounds(node) == (0.0, 1.0):
        return 0.0, 1.0
    return None


def range_encoding(vmin: float, vmax: float, bw: int = 8) -> Encoding:
    """The encoding of a fixed range. At 16 bits [0, 1] and [-1, 1] use the grids QNN's HTP requires for
    Sigmoid and Tanh outputs (scale 2^-16 offset 0; scale 2^-15 offset -2^15, as onnxruntime's QNN
    quantization config sets them); any other case is ``activation_encoding``."""
    if bw == 16 and (vmin, vmax) == (0.0, 1.0):
        return Encoding(bw=16, scale=(2.0 ** -16,), offset=(0,))
    if bw == 16 and (vmin, vmax) == (-1.0, 1.0):
        return Encoding(bw=16, scale=(2.0 ** -15,), offset=(-(2 ** 15),))
    return activation_encoding(vmin, vmax, bw)


# --- Ops whose tensors share one encoding --------------------------------------------------------
ALL = "all"


@dataclass(frozen=True)
class SharedEncoding:
    """The float tensors of an op that must share one encoding: input and output indices, or ALL.

    Every op here only moves, selects, pads or interpolates values, so its output range lies
    within its input range and one encoding serves both with no requantization on the NPU. The
    shared range is the union of the members' calibrated ranges (for Concat: the output's range,
    which is then applied to every input).
    """
    inputs: tuple | str = (0,)
    outputs: tuple | str = (0,)


SHARED_ENCODING_OPS = {
    "MaxPool": SharedEncoding(),
    "GlobalMaxPool": SharedEncoding(),
    "Reshape": SharedEncoding(),
    "Flatten": SharedEncoding(),
    "Transpose": SharedEncoding(),
    "Squeeze": SharedEncoding(),
    "Unsqueeze": SharedEncoding(),
    "Slice": SharedEncoding(),
    "Gather": SharedEncoding(),
    "Expand": SharedEncoding(),
    "Tile": SharedEncoding(),
    "DepthToSpace": SharedEncoding(),
    "SpaceToDepth": SharedEncoding(),
    "Identity": SharedEncoding(),
    "Pad": SharedEncoding(),        # the pad value is in the output's range, hence in the union
    "Resize": SharedEncoding(),     # nearest selects, linear interpolates: within the input range
    "Concat": SharedEncoding(inputs=ALL),
    "Split": SharedEncoding(outputs=ALL),
}

# Producer -> activation fusion: when a producer's output feeds only the activation, the producer's
# output takes the activation's encoding. Its quantizer then clamps exactly as the activation does
# (a Relu encoding starts at 0), so no range is wasted on values the activation discards. HardSwish
# is not here: clamping its input to HardSwish's output range would change its result.
FUSIBLE_PRODUCERS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Sub", "Mul", "BatchNormalization"})
FUSED_ACTIVATIONS = frozenset({"Relu", "Clip"})


def saturation_bounds(node, out_bw: int = 8) -> tuple[float, float] | None:
    """The input interval outside which ``node`` (a saturating activation) gives the same output as at
    its ends, so its producer's encoding need not cover more: HardSwish and HardSigmoid exactly
    (x <= -3 gives 0; the hard sigmoid is constant beyond (-beta/alpha, (1-beta)/alpha)); Sigmoid
    and Tanh up to their output rounding (beyond +-T the output is within a quarter of an
    ``out_bw``-bit step of its limit, so it rounds to the limit). None for any other op."""
    if node.op == "HardSwish":
        return -3.0, float("inf")
    if node.op == "HardSigmoid":
        alpha, beta = float(node.attrs.get("alpha", 0.2)), float(node.attrs.get("beta", 0.5))
        return (-beta / alpha, (1.0 - beta) / alpha) if alpha > 0 else None
    margin = 0.25 / (2 ** out_bw - 1)  # of the [0, 1] range; Tanh's [-1, 1] steps are twice as wide
    if node.op == "Sigmoid":
        bound = float(np.log((1.0 - margin) / margin))
        return -bound, bound
    if node.op == "Tanh":
        bound = float(np.arctanh(1.0 - 2.0 * margin))
        return -bound, bound
    return None


def union_encoding(encodings: list[Encoding], bw: int | None = None) -> Encoding:
    """One per-tensor encoding covering every encoding's range, at ``bw`` (default: the widest)."""
    bw = bw or max(e.bw for e in encodings)
    return activation_encoding(min(float(e.min[0]) for e in encodings), max(float(e.max[0]) for e in encodings), bw)


def fixed_ranges(module) -> dict:
    """Tensor name -> the range its encoding must use exactly: a ``fixed_range`` annotation, else the
    range its producing op fixes (``op_fixed_range``)."""
    ranges = {}
    for node in module.graph.nodes:
        fixed = op_fixed_range(node)
        if fixed and node.outputs:
            ranges[node.outputs[0].name] = fixed
    for name, hints in module.annotations.items():
        if "fixed_range" in hints:
            lo, hi = hints["fixed_range"]
            ranges[name] = (float(lo), float(hi))
    return ranges


QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})


def has_qdq(graph) -> bool:
    """True once encodings are materialised as QuantizeLinear/DequantizeLinear nodes."""
    return any(node.op in QDQ_OPS for node in graph.nodes)


# --- The ONNX form of an encoding (QuantizeLinear / DequantizeLinear parameters) ----------------------
# Unsigned codes q in [0, 2^bw - 1] with x = (q + offset) * scale map to ONNX's x = (s - zero_point) * scale:
# asymmetric encodings use unsigned storage (s = q, zero_point = -offset); symmetric ones signed storage
# (s = q - 2^(bw-1), zero_point = -offset - 2^(bw-1), i.e. 0). 4-bit weights are stored as int8 holding
# values in [-8, 7]: onnx-graphsurgeon cannot serialize INT4 initializers, and onnxruntime and QNN's HTP
# compute the same result from them (the .encodings file still says bw=4).
_STORAGE = {(4, True): np.int8, (8, True): np.int8, (8, False): np.uint8, (16, True): np.int16,
            (16, False): np.uint16, (32, True): np.int32}


def storage_dtype(enc: Encoding) -> np.dtype:
    try:
        return np.dtype(_STORAGE[(enc.bw, enc.symmetric)])
    except KeyError:
        kind = "symmetric" if enc.symmetric else "asymmetric"
        raise ValueError(f"no ONNX storage type for a {kind} {enc.bw}-bit encoding") from None


def qdq_params(enc: Encoding) -> tuple[np.ndarray, np.ndarray]:
    """(scale as float32, zero point in the storage type): scalars per tensor, 1-D per channel."""
    shift = 2 ** (enc.bw - 1) if enc.symmetric else 0
    scale = np.asarray(enc.scale, dtype=np.float32)
    zero_point = (-np.asarray(enc.offset, dtype=np.int64) - shift).astype(storage_dtype(enc))
    if not enc.per_channel:
        return scale.reshape(()), zero_point.reshape(())
    return scale, zero_point


def stored_values(x: np.ndarray, enc: Encoding) -> np.ndarray:
    """``x`` quantized with ``enc``, in the storage type DequantizeLinear reads, divided as QuantizeLinear
    divides: in float32. A consumer that applies the encodings file to the float tensor (AIMET's
    encodings_to_onnx_qdq, the converter) gets the same integers; in float64 a weight within a float32 ulp
    of a half step rounded the other way (rec W8A8: a Conv one step off, the output at cosine 0.9983), and an
    int32 bias past 2^24 steps (tiny weight scales) another integer (det at 0.99974)."""
    scale, offset = _broadcast(enc, np.ndim(x))
    codes = np.round(np.asarray(x, dtype=np.float32) / np.asarray(scale, dtype=np.float32)).astype(np.float64)
    if enc.bw == 32 and enc.symmetric:
        return np.asarray(np.clip(codes, -(2 ** 31), 2 ** 31 - 1)).astype(np.int32)
    shift = 2 ** (enc.bw - 1) if enc.symmetric else 0
    return np.asarray(np.clip(codes - offset, 0, 2 ** enc.bw - 1) - shift).astype(storage_dtype(enc))


def encoding_from_qdq(scale: np.ndarray, zero_point: np.ndarray, axis: int | None, bw: int | None = None) -> Encoding:
    """The inverse of ``qdq_params``: an Encoding from a QDQ node's scale and zero point."""
    dtype = np.dtype(zero_point.dtype)
    symmetric = dtype.kind == "i"
    bw = bw or dtype.itemsize * 8
    shift = 2 ** (bw - 1) if symmetric else 0
    offsets = tuple(int(-z - shift) for z in np.asarray(zero_point, dtype=np.int64).reshape(-1))
    scales = tuple(float(s) for s in np.asarray(scale, dtype=np.float32).reshape(-1))
    return Encoding(bw=bw, scale=scales, offset=offsets, symmetric=symmetric,
                    axis=axis if np.ndim(scale) == 1 else None)


# --- what each HTP generation accepts and computes (measured: docs/htp-backend.md) ------------------------------

@dataclass(frozen=True)
class HtpArch:
    """One Hexagon NPU generation as QNN's HTP backend (onnxruntime-qnn 2.7.0) runs it. v68 and v69 also round
    16-bit convolutions differently from the simulation (docs/htp-backend.md); nothing qcc chooses depends on
    that yet, so it is not a field."""
    version: str
    weight_bits: tuple  # widths of quantized weights it takes (v68 and v69 refuse 16-bit weights)

    def weight_problem(self, bits: int) -> str:
        """Why this generation cannot run ``bits``-bit weights ('' if it can; 4-bit weights stored in int8 pass)."""
        if bits <= max(self.weight_bits):
            return ""
        return (f"{bits}-bit weight; HTP v{self.version} takes {' or '.join(map(str, self.weight_bits))}-bit weights "
                f"(16 needs v73 or later)")


HTP_ARCHS = {version: HtpArch(version, (4, 8) if version in ("68", "69") else (4, 8, 16))
             for version in ("68", "69", "73", "75", "79", "81")}
