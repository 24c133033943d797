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


def weight_encoding(weights: np.ndarray, bw: int = 8, axis: int | None = 0) -> Encoding:
    """Symmetric signed encoding; per channel along ``axis`` (None for per tensor).

    A channel whose weights are all zero (padded channels) gets the minimum range,
    so its scale is valid and its values quantize to exactly zero.
    """
    w = np.asarray(weights, dtype=np.float64)
    if axis is None:
        absmax = np.array([np.abs(w).max() if w.size else 0.0])
    else:
        absmax = np.abs(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)).max(axis=1)
    half = 2 ** (bw - 1)
    # Symmetric range [-absmax, absmax] on 2^bw - 1 steps with offset -2^(bw-1): scale = absmax / (2^(bw-1) - 1)
    absmax = np.maximum(absmax, MIN_RANGE / 2)
    scale = absmax / (half - 1)
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
