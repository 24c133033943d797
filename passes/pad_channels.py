"""Pad the channel counts of Conv/ConvTranspose/Gemm/MatMul to a multiple of the HMX tile (32 or 64).

HMX processes channels in tiles of ``multiple``; a layer with 24 channels costs a full 32-tile
anyway, and odd widths force re-layouts between layers. Padding is float-exact:

    producer (Conv, ConvTranspose, Gemm, MatMul with constant weights):
        W'[o, ...] = W[o, ...] for real output channels, 0 for padded ones; bias 0 there
        -> padded channels of its output are exactly 0
    consumer:  W'[:, i, ...] = 0 for every padded input channel i -> they never reach a real output
    depthwise conv (group == C_in == C_out): padded together with its group count (group' = W)

    %a = Conv(%x, @w[24,16,3,3])        %a = Conv(%x, @w'[32,16,3,3])      float[1,32,H,W]
    %r = Relu(%a)                  ->   %r = Relu(%a)
    %y = Conv(%r, @v[40,24,1,1])        %y = Conv(%r, @v'[64,32,1,1])      (then a Slice if
                                                                           %y is a graph output)

Which tensors must share a padded layout is a connected-component question (networkx): the
channel-wise ops below tie their channel operands to their output, so a residual ``Add(a, b)``
ties a and b, and the SE-block ``Mul(x, gate)`` ties x with its (N, C, 1, 1) gate. A component is
padded when every tensor in it comes from a padded producer (a linear layer, a channel Split) or a
channel-wise op; one produced by anything else (a graph input, a Reshape or Transpose that moves
channels, a grouped conv, an unknown op, ...) keeps its
width, and the convs that read or write it are remarked. Graph inputs and outputs keep their
names and shapes: the stem conv's input channels (3 for an RGB image) are NOT padded (that would
need a Pad of the image and multiply the stem's MACs); a padded graph output gets a Slice.

Channel-wise ops carried through (output channel c depends on input channel c only):
  unary ops finite for every finite input (Relu, Clip, Sigmoid, HardSigmoid, HardSwish, Tanh, Elu,
  Softplus, Erf, Abs, Neg, Identity, Cast, Dropout, ...; not Log/Sqrt/Reciprocal/Exp, which could
  turn a padded channel into Inf or NaN), pools, PRelu (per-channel slope padded with 0),
  BatchNormalization (padded with scale 1, bias 0, mean 0, var 1), InstanceNormalization (scale 1,
  bias 0), Resize (channel scale 1; explicit ``sizes`` rewritten),
  ops along other axes: Softmax/LogSoftmax/Hardmax and LayerNormalization with axis >= 2,
  reductions whose axes leave axis 1 in place, Transpose with perm[:2] == [0, 1], Slice and Pad of
  other axes (a Slice of axis 1 from 0 to its end or past it gets the padded width as its end),
  Concat and Split along other axes (constant Concat inputs padded with zero channels),
  Add/Sub/Mul/Div/Max/Min/Sum/Mean with a constant: per-channel constants padded with 0 (a Div
  divisor with 1); a constant that broadcasts over channels is expanded to per-channel and padded
  with 0 where it would otherwise move 0 (Add 3 -> Add [3, .., 3, 0, .., 0]; Mul by a scalar keeps
  it as is), the same ops on tensors of the same channel count (tied; a tensor divisor declines:
  its padded 0 would give NaN), Mul by a tensor with one channel (N, 1, H, W),
  Reshape/Flatten/Squeeze/Unsqueeze that keep axes 0 and 1 (e.g. (N, C, 1, 1) <-> (N, C), as in
  an SE block rewritten to Gemm); a Reshape target that spells C becomes the padded width,
  Concat along channels, option ``concat``: ``interleave`` concatenates the padded inputs as they
  are, so the output's real channels sit at the inputs' offsets ([a 24 | 0 x8 | b 24 | 0 x8]) and
  its consumers get zero weights at the gaps (no data moves, but consumers read sum(W_i)
  channels); ``compact`` slices each input to its real channels, concatenates them and zero-pads
  the result with a Pad up to the multiple; ``auto`` (default) compacts when that makes the
  output narrower (det: 4 x 24 -> 96 channels instead of 128) or when the interleaved width is
  off the multiple (an unpadded input such as the image) and a consumer reads it padded,
  Split along channels: each part gets its own padded width; when the input's layout is the parts'
  layouts side by side it is split in place (new sizes), otherwise its real channels are split and
  each part zero-padded by a Pad (only if a consumer reads that part padded).
Any other consumer (a Transpose or Reshape that moves channels, Softmax/reduction/normalisation
over channels, GroupNormalization, a tensor-divisor Div, a Slice or Pad of channels, unknown ops,
graph outputs) reads a Slice (or, after a Concat, a Gather) back to the real channels.

Quantization: padded weights and biases are exact zeros, and the rules above map a padded 0 to 0,
so padded activations stay exactly 0 (zero is always representable in qcc's encodings) -- except
after an op with f(0) != 0 (HardSigmoid/Sigmoid 0 -> 0.5, Softplus, Cos, a Clip whose range
excludes 0, a normalisation along other axes, a Softmax, a Pad with a non-zero constant). Those
values are finite and only zero weights, a Slice or a Mul with a padded 0 read them (the SE gate),
so the float and the quantized results are unchanged; only those tensors' padded channels are
non-zero.

Stats: ``convs-padded`` (Conv/ConvTranspose/Gemm/MatMul whose weights changed), ``convs-declined``
(linear layers left off the multiple on a side other than a graph input, each with a remark), ``channels-added``
(output channels added over those layers), ``extra-macs-pct`` (MACs of all such layers after vs
before, in percent), ``slices-inserted`` (Slice/Gather back to the real channels),
``pads-inserted`` (Pad after a compacted Concat or Split).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import onnx_graphsurgeon as gs

from compiler.ir import Module, QccError, const_value, make_const, unique_name
from compiler.linear import LINEAR_OPS
from compiler.pass_manager import Pass, PassContext, PassKind, PassResult, choices, register
from compiler.patterns import const_input, producer

# One output channel from the same input channel, finite for every finite input (so no Log, Sqrt,
# Reciprocal, Exp: a padded channel must never become Inf or NaN).
UNARY_CHANNEL_WISE = frozenset({
    "Identity", "Cast", "Dropout", "Relu", "LeakyRelu", "Elu", "Selu", "Celu", "ThresholdedRelu", "HardSwish",
    "HardSigmoid", "Sigmoid", "Tanh", "Softplus", "Softsign", "Mish", "Gelu", "Erf", "Abs", "Neg", "Sign",
    "Floor", "Ceil", "Round", "Sin", "Cos", "Clip", "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool",
    "GlobalMaxPool", "GlobalLpPool"})
ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean"})
SOFTMAX_LIKE = frozenset({"Softmax", "LogSoftmax", "Hardmax"})
REDUCTIONS = frozenset({"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
                        "ReduceSumSquare", "ReduceLogSumExp"})
CHANNEL_KEEPING_RESHAPES = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze"})
BATCH_NORM_FILLS = {1: 1.0, 2: 0.0, 3: 0.0, 4: 1.0}  # scale, bias, mean, var of a padded channel
INSTANCE_NORM_FILLS = {1: 1.0, 2: 0.0}  # scale, bias: a padded all-zero channel normalises to 0


@dataclass(frozen=True)
class Layout:
    """Where each real channel of a tensor sits in its padded channel axis of size ``width``."""
    positions: tuple
    width: int

    @staticmethod
    def identity(channels: int) -> "Layout":
        return Layout(tuple(range(channels)), channels)

    @property
    def channels(self) -> int:
        return len(self.positions)

    @property
    def is_identity(self) -> bool:
        return self.width == len(self.positions)

    @property
    def is_prefix(self) -> bool:
        return self.positions == tuple(range(len(self.positions)))


@dataclass(frozen=True)
class ConstPad:
    """A constant input padded along ``axis`` with ``fill``; ``expand_rank`` > 0: it broadcasts
    over channels and is first expanded to that rank with one entry per channel on axis 1."""
    index: int
    axis: int
    fill: float
    expand_rank: int = 0


@dataclass
class Role:
    """How a node treats the channel axis of its tensors."""
    kind: str  # linear | depthwise | tie | concat | split | opaque
    reason: str = ""  # opaque: why the node cannot carry padded channels
    tied: tuple = ()  # tie/depthwise: inputs that share the layout of every output
    const_pads: tuple = ()  # ConstPad of tied / depthwise / linear (bias) constants
    weight_axes: tuple = (None, None)  # linear: (input-channel axis, output-channel axis) of the weight
    takes_padded_input: bool = True  # linear: input 0 may be padded (zero weights absorb it)
    size_entry: tuple | None = None  # (input index, entry): a shape/sizes constant naming the channel count


def opaque(reason: str) -> Role:
    return Role("opaque", reason=reason)


def channels_of(tensor) -> int | None:
    """The channel count (axis 1) of a variable of known rank >= 2, else None."""
    if not isinstance(tensor, gs.Variable) or not tensor.name or tensor.shape is None or len(tensor.shape) < 2:
        return None
    c = tensor.shape[1]
    return c if isinstance(c, (int, np.integer)) and c > 0 else None


def _known_shape(tensor) -> list | None:
    shape = getattr(tensor, "shape", None)
    if shape is None or not all(isinstance(d, (int, np.integer)) and d >= 0 for d in shape):
        return None
    return [int(d) for d in shape]


def _optional_const(node, index):
    """(present, value): an absent optional input is (False, None)."""
    if index >= len(node.inputs) or not node.inputs[index].name:
        return False, None
    return True, const_input(node, index)


def _broadcast_const(values: np.ndarray, index: int, out_rank: int, channels: int, fill: float,
                     keeps_zero: bool) -> ConstPad | None | str:
    """How to pad a constant operand broadcast against an output of rank ``out_rank``.

    Returns a ConstPad, None (nothing to pad) or a string saying why it cannot be padded.
    """
    if values.ndim > out_rank:
        return f"its constant input {index} has a higher rank than the output"
    axis = values.ndim - out_rank + 1  # the constant's axis aligned with the channel axis
    if axis >= 0 and values.shape[axis] == channels:
        return ConstPad(index, axis, fill)
    if axis >= 0 and values.shape[axis] != 1:
        return f"its constant input {index} does not broadcast over the channels"
    return None if keeps_zero else ConstPad(index, 1, 0.0, expand_rank=out_rank)


def _classify_linear(node) -> Role:
    weight = const_input(node, 1)
    if weight is None:
        return opaque("its weight is not a constant")
    x, y = node.inputs[0], node.outputs[0]
    if channels_of(y) is None:
        return opaque("its output shape is unknown")
    has_bias, bias = _optional_const(node, 2)
    if has_bias and bias is None:
        return opaque("its bias is not a constant")
    if node.op in ("Conv", "ConvTranspose"):
        if weight.ndim < 3 or (has_bias and bias.ndim != 1):
            return opaque("its weight or bias has an unexpected rank")
        group = int(node.attrs.get("group", 1))
        out_axis = 0 if node.op == "Conv" else 1
        bias_pad = (ConstPad(2, 0, 0.0),) if has_bias else ()
        if group == 1:
            return Role("linear", weight_axes=(1 - out_axis, out_axis), const_pads=bias_pad)
        if weight.shape[1] == 1 and weight.shape[0] == group and channels_of(x) == group and channels_of(y) == group:
            return Role("depthwise", tied=(0,), const_pads=(ConstPad(1, 0, 0.0),) + bias_pad)
        return opaque(f"it is a grouped convolution (group={group}) that is not depthwise")
    if weight.ndim != 2 or len(y.shape) != 2:
        return opaque("it is not a 2-D matrix product")
    if node.op == "MatMul":
        if channels_of(x) is None or len(x.shape) != 2:
            return opaque("its input is not a matrix of known shape")
        return Role("linear", weight_axes=(0, 1))
    trans_b = bool(node.attrs.get("transB", 0))
    role = Role("linear", weight_axes=(1, 0) if trans_b else (0, 1),
                takes_padded_input=not node.attrs.get("transA", 0))
    if has_bias:
        pad = _broadcast_const(bias, 2, 2, weight.shape[0 if trans_b else 1], 0.0, keeps_zero=not bias.any())
        if isinstance(pad, str):
            return opaque(pad)
        role.const_pads = (pad,) if pad else ()
    return role


def _classify_elementwise(node, channels: int, rank: int) -> Role:
    tied, pads = [], []
    for index, tensor in enumerate(node.inputs):
        divisor = node.op == "Div" and index == 1
        values = const_value(tensor)
        if values is not None:
            if node.op == "Div" and index == 0:
                return opaque("its dividend is a constant (the divisor would be 0 on padded channels)")
            keeps_zero = node.op == "Mul" or divisor or not values.any()
            pad = _broadcast_const(values, index, rank, channels, 1.0 if divisor else 0.0, keeps_zero)
            if isinstance(pad, str):
                return opaque(pad)
            if pad:
                pads.append(pad)
            continue
        c = channels_of(tensor)
        if c is None or len(tensor.shape) != rank:
            return opaque(f"its input {index} has an unknown channel count or another rank")
        if c == channels:
            if divisor:
                return opaque("its divisor is a tensor (0 on padded channels would give NaN)")
            tied.append(index)
        elif not (c == 1 and node.op == "Mul"):
            return opaque(f"its input {index} broadcasts over the channels")
    if not tied:
        return opaque("no input carries the output's channels")
    return Role("tie", tied=tuple(tied), const_pads=tuple(pads))


def _classify_resize(node, opset: int) -> Role:
    mode = node.attrs.get("coordinate_transformation_mode", "half_pixel")
    if mode == "tf_crop_and_resize":
        return opaque("tf_crop_and_resize crops with per-axis ROI")
    axes = node.attrs.get("axes")
    if axes is not None:
        rank = len(node.inputs[0].shape)
        axes = [a % rank for a in axes]
    entry = (axes.index(1) if 1 in axes else None) if axes is not None else 1
    scales_index = 1 if opset < 11 else 2
    has_scales, scales = _optional_const(node, scales_index)
    has_sizes, sizes = _optional_const(node, 3) if opset >= 11 else (False, None)
    if (has_scales and scales is None) or (has_sizes and sizes is None):
        return opaque("its scales or sizes are not constant")
    if entry is not None and has_scales and scales.size and scales[entry] != 1:
        return opaque("it resizes the channel axis")
    role = Role("tie", tied=(0,))
    if entry is not None and has_sizes and sizes.size:
        role.size_entry = (3, entry)
    return role


def _classify_reshape(node, channels: int) -> Role:
    x_shape, y_shape = _known_shape(node.inputs[0]), _known_shape(node.outputs[0])
    if x_shape is None or y_shape is None or len(x_shape) < 2 or len(y_shape) < 2:
        return opaque("its shapes are unknown")
    if x_shape[:2] != y_shape[:2] or int(np.prod(x_shape[2:])) != int(np.prod(y_shape[2:])):
        return opaque("it moves the channel axis")
    role = Role("tie", tied=(0,))
    if node.op == "Reshape":
        target = const_input(node, 1)
        if target is None:
            return opaque("its target shape is not constant")
        if target.size > 1 and target[1] == channels:
            role.size_entry = (1, 1)
        elif target.size < 2 or target[1] not in (0, -1) or (target[1] == 0 and node.attrs.get("allowzero", 0)):
            return opaque("its target shape does not keep the channel axis")
    return role


def _axes(node, index: int, rank: int) -> list | str | None:
    """A node's normalised ``axes``, from its attribute or its input ``index`` (None: absent)."""
    if "axes" in node.attrs:
        return [int(a) % rank for a in node.attrs["axes"]]
    present, values = _optional_const(node, index)
    if present and values is None:
        return "its axes are not constant"
    return [int(a) % rank for a in values] if present else None


def _classify_slice(node, opset: int, channels: int, rank: int) -> Role:
    """A Slice that keeps every channel: axis 1 not sliced, or sliced from 0 to (at least) the end."""
    if opset < 10:
        axes = [a % rank for a in node.attrs.get("axes", range(len(node.attrs.get("starts", []))))]
        return opaque("it slices the channel axis") if 1 in axes else Role("tie", tied=(0,))
    bounds = [const_input(node, i) for i in (1, 2)]
    axes = _axes(node, 3, rank)
    present, steps = _optional_const(node, 4)
    if any(b is None for b in bounds) or isinstance(axes, str) or (present and steps is None):
        return opaque("its starts, ends, axes or steps are not constant")
    axes = list(range(len(bounds[0]))) if axes is None else axes
    if 1 not in axes:
        return Role("tie", tied=(0,))
    entry = axes.index(1)
    if bounds[0][entry] != 0 or (present and steps[entry] != 1) or bounds[1][entry] < channels:
        return opaque("it slices the channel axis")
    return Role("tie", tied=(0,), size_entry=(2, entry))


def _classify_pad(node, opset: int, rank: int) -> Role:
    pads = node.attrs.get("pads") if opset < 11 else const_input(node, 1)
    axes = _axes(node, 3, rank) if opset >= 18 else None
    if pads is None or isinstance(axes, str):
        return opaque("its pads or axes are not constant")
    axes = list(range(rank)) if axes is None else axes
    if 1 in axes and (pads[axes.index(1)] or pads[axes.index(1) + len(axes)]):
        return opaque("it pads the channel axis")
    return Role("tie", tied=(0,))


def _classify_along_axis(node, opset: int, rank: int) -> Role | None:
    """Ops that work along other axes than channels (None: not one of them)."""
    if node.op in SOFTMAX_LIKE or node.op == "LayerNormalization":
        # Softmax before opset 13 and LayerNormalization work on the flattened axes [axis, rank).
        default = -1 if node.op == "LayerNormalization" or opset >= 13 else 1
        axis = int(node.attrs.get("axis", default)) % rank
        return Role("tie", tied=(0,)) if axis >= 2 else opaque(f"it normalises along the channel axis (axis {axis})")
    if node.op in REDUCTIONS:
        axes = _axes(node, 1, rank)
        if isinstance(axes, str):
            return opaque(axes)
        if not axes and node.attrs.get("noop_with_empty_axes", 0):
            return Role("tie", tied=(0,))
        kept = (1,) if node.attrs.get("keepdims", 1) else (0, 1)
        return opaque("it reduces over the channel axis") if axes is None or set(kept) & set(axes) else Role("tie", tied=(0,))
    if node.op == "Transpose":
        perm = list(node.attrs.get("perm", range(rank - 1, -1, -1)))
        return Role("tie", tied=(0,)) if perm[:2] == [0, 1] else opaque("it moves the channel axis")
    return None


def _classify_concat(node, channels: int, rank: int) -> Role:
    axis = int(node.attrs.get("axis", 0)) % rank
    if axis == 1:
        widths = [channels_of(t) for t in node.inputs]
        if any(w is None or len(t.shape) != rank for w, t in zip(widths, node.inputs)) or sum(widths) != channels:
            return opaque("an input is a constant or has an unknown channel count")
        return Role("concat")
    tied, pads = [], []
    for index, tensor in enumerate(node.inputs):
        values = const_value(tensor)
        if values is not None and values.ndim == rank and values.shape[1] == channels:
            pads.append(ConstPad(index, 1, 0.0))
        elif values is None and channels_of(tensor) == channels and len(tensor.shape) == rank:
            tied.append(index)
        else:
            return opaque(f"its input {index} has another channel count")
    return Role("tie", tied=tuple(tied), const_pads=tuple(pads))


def _classify_split(node, rank: int) -> Role:
    x = node.inputs[0]
    widths = [channels_of(t) for t in node.outputs]
    if channels_of(x) is None or any(w is None for w in widths) or len(x.shape) != rank:
        return opaque("its channel counts are unknown")
    if int(node.attrs.get("axis", 0)) % rank != 1:
        return Role("tie", tied=(0,)) if set(widths) == {channels_of(x)} else opaque("its parts differ in channels")
    return Role("split") if sum(widths) == channels_of(x) else opaque("its parts do not add up to its input")


def classify(node, opset: int) -> Role:
    if node.domain not in (None, "", "ai.onnx"):
        return opaque(f"it is in domain '{node.domain}'")
    if node.op in LINEAR_OPS:
        return _classify_linear(node)
    out = node.outputs[0] if node.outputs else None
    channels = channels_of(out)
    if channels is None:
        return opaque("its output shape is unknown")
    rank = len(out.shape)
    if node.op == "Split":
        return _classify_split(node, rank)
    if len([t for t in node.outputs if t.name]) != 1:
        return opaque("it has several outputs")
    if node.op == "Concat":
        return _classify_concat(node, channels, rank)
    if node.op in ELEMENTWISE:
        return _classify_elementwise(node, channels, rank)
    x = node.inputs[0] if node.inputs else None
    along_axis = _classify_along_axis(node, opset, len(x.shape)) if channels_of(x) else None
    if along_axis is not None:
        return along_axis
    if channels_of(x) != channels:
        return opaque("its input and output channel counts differ")
    if len(x.shape) != rank and node.op not in CHANNEL_KEEPING_RESHAPES:
        return opaque("its input and output ranks differ")
    if node.op in UNARY_CHANNEL_WISE:
        return Role("tie", tied=(0,))
    if node.op == "PRelu":
        slope = const_input(node, 1)
        pad = "its slope is not a constant" if slope is None else _broadcast_const(slope, 1, rank, channels, 0.0, True)
        return opaque(pad) if isinstance(pad, str) else Role("tie", tied=(0,), const_pads=(pad,) if pad else ())
    if node.op in ("BatchNormalization", "InstanceNormalization"):
        fills = BATCH_NORM_FILLS if node.op == "BatchNormalization" else INSTANCE_NORM_FILLS
        if any(const_input(node, i) is None or const_input(node, i).shape != (channels,) for i in fills):
            return opaque("its parameters are not per-channel constants")
        return Role("tie", tied=(0,), const_pads=tuple(ConstPad(i, 0, fill) for i, fill in fills.items()))
    if node.op == "Slice":
        return _classify_slice(node, opset, channels, rank)
    if node.op == "Pad":
        return _classify_pad(node, opset, rank)
    if node.op == "Resize":
        return _classify_resize(node, opset)
    if node.op in CHANNEL_KEEPING_RESHAPES:
        return _classify_reshape(node, channels)
    return opaque(f"{node.op} is not channel-wise")


@dataclass
class Component:
    """Tensors that must share one padded layout."""
    members: list
    channels: int | None
    fixed_reason: str | None = None
    concats: list = field(default_factory=list)
    layout: Layout | None = None
    read_padded: bool = False  # a consumer of a member reads the padded channels as they are
    written_padded: bool = False  # a linear layer writes a member (its padded channels cost no extra node)

    def why_unaligned(self, multiple: int) -> str:
        if self.fixed_reason:
            return self.fixed_reason
        return f"it is a Concat of inputs whose padded widths add up to {self.layout.width}, not a multiple of {multiple}"


def _round_up(channels: int, multiple: int) -> int:
    return -(-channels // multiple) * multiple


def _scatter(values: np.ndarray, axis: int, layout: Layout | None, fill: float) -> np.ndarray:
    if layout is None or layout.is_identity:
        return values
    shape = list(values.shape)
    shape[axis] = layout.width
    out = np.full(shape, fill, dtype=values.dtype)
    index = [slice(None)] * values.ndim
    index[axis] = np.asarray(layout.positions)
    out[tuple(index)] = values
    return out


def _pad_const(values: np.ndarray, pad: ConstPad, layout: Layout) -> np.ndarray:
    if pad.expand_rank:
        values = values.reshape((1,) * (pad.expand_rank - values.ndim) + values.shape)
        shape = list(values.shape)
        shape[pad.axis] = layout.channels
        values = np.broadcast_to(values, shape)
    return _scatter(values, pad.axis, layout, pad.fill)


def _macs(node) -> int | None:
    """Multiply-accumulates of a linear node: (positions) x (weight size); None if shapes are unknown."""
    weight = const_input(node, 1)
    if weight is None:
        return None
    if node.op == "Conv":
        shape = _known_shape(node.outputs[0])
    elif node.op == "ConvTranspose":
        shape = _known_shape(node.inputs[0])
    else:
        shape = _known_shape(node.outputs[0])
        return None if shape is None or weight.ndim != 2 else int(np.prod(shape[:-1])) * weight.size
    return None if shape is None or len(shape) < 3 else shape[0] * int(np.prod(shape[2:])) * weight.size


def _linear_channels(node) -> tuple[int, int] | None:
    """(input, output) channel counts a linear node computes with, from its weight."""
    weight = const_input(node, 1)
    if weight is None or weight.ndim < 2:
        return None
    if node.op == "Conv":
        return weight.shape[1] * int(node.attrs.get("group", 1)), weight.shape[0]
    if node.op == "ConvTranspose":
        return weight.shape[0], weight.shape[1] * int(node.attrs.get("group", 1))
    if node.op == "Gemm" and node.attrs.get("transB", 0):
        return weight.shape[1], weight.shape[0]
    return weight.shape[0], weight.shape[1]


class _Rewriter:
    """Applies a plan of layouts to the graph: new weights, padded constants, Slices."""

    def __init__(self, module: Module, layouts: dict):
        self.module = module
        self.graph = module.graph
        self.opset = module.opset
        self.layouts = layouts
        self.unpadded = {}  # tensor name -> its Slice/Gather back to the real channels
        self.padded_consts = {}  # (constant name, how) -> new constant, so shared weights stay shared
        self.stats = {"convs-padded": 0, "channels-added": 0, "slices-inserted": 0, "pads-inserted": 0}

    def layout(self, tensor) -> Layout | None:
        return self.layouts.get(tensor.name) if tensor.name else None

    def padded(self, tensor) -> bool:
        layout = self.layout(tensor)
        return layout is not None and not layout.is_identity

    def _const(self, node, index: int, values: np.ndarray, key: tuple) -> None:
        old = node.inputs[index]
        cache_key = (old.name, key)
        if cache_key not in self.padded_consts:
            self.padded_consts[cache_key] = make_const(self.graph, f"{old.name}_padded", values)
        node.inputs[index] = self.padded_consts[cache_key]

    def _to_real_channels(self, source, target=None):
        """A Slice (prefix layout) or Gather (Concat layout) of ``source`` back to its real channels."""
        layout = self.layout(source)
        if target is None and source.name in self.unpadded:
            return self.unpadded[source.name]
        if target is None:
            self.unpadded[source.name] = out = gs.Variable(
                unique_name(self.graph, f"{source.name}_unpadded"), dtype=source.dtype,
                shape=[source.shape[0], layout.channels, *source.shape[2:]])
        else:
            out = target
        if layout.is_prefix:
            bounds = [("starts", 0), ("ends", layout.channels), ("axes", 1)]
            if self.opset >= 10:
                inputs = [source]
                for what, value in bounds:
                    inputs.append(make_const(self.graph, f"{source.name}_unpad_{what}", np.array([value], np.int64)))
                node = gs.Node("Slice", name=unique_name(self.graph, f"{source.name}_unpad"), inputs=inputs, outputs=[out])
            else:
                node = gs.Node("Slice", name=unique_name(self.graph, f"{source.name}_unpad"), inputs=[source],
                               outputs=[out], attrs={what: [value] for what, value in bounds})
        else:
            indices = make_const(self.graph, f"{source.name}_real_channels", np.array(layout.positions, np.int64))
            node = gs.Node("Gather", name=unique_name(self.graph, f"{source.name}_unpad"), inputs=[source, indices],
                           outputs=[out], attrs={"axis": 1})
        self.graph.nodes.append(node)
        self.stats["slices-inserted"] += 1
        return out

    def split_graph_outputs(self) -> None:
        """A padded graph output is renamed ``<name>_padded``; a Slice writes the original name and shape."""
        for tensor in list(self.graph.outputs):
            if not self.padded(tensor) or any(t is tensor for t in self.graph.inputs):
                continue
            layout = self.layouts.pop(tensor.name)
            inner = gs.Variable(unique_name(self.graph, f"{tensor.name}_padded"), dtype=tensor.dtype, shape=list(tensor.shape))
            src = producer(tensor)
            src.outputs[src.outputs.index(tensor)] = inner
            for user in list(tensor.outputs):
                for i, t in enumerate(user.inputs):
                    if t is tensor:
                        user.inputs[i] = inner
            self.layouts[inner.name] = layout
            if tensor.name in self.module.annotations:  # quantization hints hold for the padded tensor too
                self.module.annotate(inner.name, **self.module.annotations[tensor.name])
            self.unpadded[inner.name] = self._to_real_channels(inner, target=tensor)

    def resize_tensors(self) -> None:
        for name, tensor in self.graph.tensors().items():
            layout = self.layouts.get(name)
            if layout is not None and not layout.is_identity and isinstance(tensor, gs.Variable):
                tensor.shape = [tensor.shape[0], layout.width, *tensor.shape[2:]]

    def rewrite(self, node, role: Role) -> None:
        if role.kind == "linear":
            self._rewrite_linear(node, role)
        elif role.kind == "depthwise":
            self._rewrite_depthwise(node, role)
        elif role.kind == "tie":
            self._rewrite_tie(node, role)
        elif role.kind == "concat":
            layout = self.layout(node.outputs[0])
            if layout != concat_layout(node.inputs, self.layouts):  # compact: concatenate the real channels
                self._unpad_inputs(node)
                if not layout.is_identity:
                    self._pad_after(node, 0, layout)
        elif role.kind == "split":
            self._rewrite_split(node)
        else:
            self._unpad_inputs(node)

    def _pad_after(self, node, index: int, layout: Layout) -> None:
        """Zero-pad the channels of ``node``'s output ``index`` up to ``layout.width`` with a Pad node."""
        out = node.outputs[index]
        real = gs.Variable(unique_name(self.graph, f"{out.name}_real"), dtype=out.dtype,
                           shape=[out.shape[0], layout.channels, *out.shape[2:]])
        node.outputs[index] = real
        rank = len(out.shape)
        pads = [0] * (2 * rank)
        pads[rank + 1] = layout.width - layout.channels
        name = unique_name(self.graph, f"{out.name}_pad")
        if self.opset >= 11:
            amounts = make_const(self.graph, f"{out.name}_pads", np.array(pads, np.int64))
            pad = gs.Node("Pad", name=name, inputs=[real, amounts], outputs=[out])
        else:
            pad = gs.Node("Pad", name=name, inputs=[real], outputs=[out], attrs={"pads": pads})
        self.graph.nodes.append(pad)
        self.stats["pads-inserted"] += 1

    def _unpad_inputs(self, node) -> None:
        for i, tensor in enumerate(node.inputs):
            if self.padded(tensor):
                node.inputs[i] = self._to_real_channels(tensor)

    def _rewrite_linear(self, node, role: Role) -> None:
        x, y = node.inputs[0], node.outputs[0]
        if not role.takes_padded_input and self.padded(x):
            node.inputs[0] = self._to_real_channels(x)
        in_layout = self.layout(x) if role.takes_padded_input and self.padded(x) else None
        out_layout = self.layout(y) if self.padded(y) else None
        if in_layout is None and out_layout is None:
            return
        in_axis, out_axis = role.weight_axes
        weight = _scatter(_scatter(const_input(node, 1), in_axis, in_layout, 0.0), out_axis, out_layout, 0.0)
        self._const(node, 1, weight, ("weight", in_layout, out_layout))
        if out_layout is not None:
            for pad in role.const_pads:
                self._const(node, pad.index, _pad_const(const_input(node, pad.index), pad, out_layout), (pad, out_layout))
            self.stats["channels-added"] += out_layout.width - out_layout.channels
        self.stats["convs-padded"] += 1

    def _rewrite_depthwise(self, node, role: Role) -> None:
        layout = self.layout(node.outputs[0])
        if layout is None or layout.is_identity:
            return
        for pad in role.const_pads:
            self._const(node, pad.index, _pad_const(const_input(node, pad.index), pad, layout), (pad, layout))
        node.attrs["group"] = layout.width
        self.stats["convs-padded"] += 1
        self.stats["channels-added"] += layout.width - layout.channels

    def _rewrite_split(self, node) -> None:
        """Split the padded input as it is when its layout is the parts' layouts side by side; otherwise
        split its real channels and zero-pad each padded part with a Pad."""
        x, parts = node.inputs[0], node.outputs
        layouts = [self.layout(t) for t in parts]
        if not self.padded(x) and all(layout.is_identity for layout in layouts):
            return
        if self.layout(x) == concat_layout(parts, self.layouts):
            sizes = [layout.width for layout in layouts]
        else:
            self._unpad_inputs(node)
            for index, layout in enumerate(layouts):
                if not layout.is_identity:
                    self._pad_after(node, index, layout)
            sizes = [layout.channels for layout in layouts]
        if self.opset < 13:
            node.attrs["split"] = sizes
        else:
            node.attrs.pop("num_outputs", None)
            split = make_const(self.graph, f"{x.name}_split", np.array(sizes, np.int64))
            if len(node.inputs) > 1:
                node.inputs[1] = split
            else:
                node.inputs.append(split)

    def _rewrite_tie(self, node, role: Role) -> None:
        layout = self.layout(node.outputs[0])
        if layout is None or layout.is_identity:
            return
        for pad in role.const_pads:
            self._const(node, pad.index, _pad_const(const_input(node, pad.index), pad, layout), (pad, layout))
        if role.size_entry:
            index, entry = role.size_entry
            values = const_input(node, index).copy()
            values[entry] = layout.width
            self._const(node, index, values, ("size", entry, layout.width))


def concat_layout(tensors, layouts: dict) -> Layout:
    """The layout of a channel Concat of padded ``tensors``: each one's real channels at its offset."""
    positions, offset = [], 0
    for tensor in tensors:
        layout = layouts[tensor.name]
        positions.extend(offset + p for p in layout.positions)
        offset += layout.width
    return Layout(tuple(positions), offset)


def _source_kind(tensor, graph, roles) -> tuple[str, str | None]:
    """('free' | 'tied' | 'concat' | 'fixed', why fixed) for the producer of a channel tensor."""
    if any(t is tensor for t in graph.inputs):
        return "fixed", f"'{tensor.name}' is a graph input, whose shape is kept"
    src = producer(tensor)
    if src is None:
        return "fixed", f"tensor '{tensor.name}' has no producer"
    role = roles[id(src)]
    if role.kind in ("linear", "split"):
        return "free", None
    if role.kind in ("tie", "depthwise"):
        return "tied", None
    if role.kind == "concat":
        return "concat", None
    return "fixed", f"they come from {src.op} '{src.name}', which is not padded: {role.reason}"


def plan_components(graph: gs.Graph, roles: dict, multiple: int, concat: str) -> tuple[dict, dict]:
    """Group the channel tensors that must share a layout and choose each group's layout.

    Returns (tensor name -> Component, tensor name -> Layout).
    """
    tensors = [t for t in graph.tensors().values() if channels_of(t) is not None]
    order = {t.name: i for i, t in enumerate(tensors)}
    by_name = {t.name: t for t in tensors}
    ties = nx.Graph()
    ties.add_nodes_from(order)
    for node in graph.nodes:
        role = roles[id(node)]
        if role.kind in ("tie", "depthwise"):
            ties.add_edges_from((node.inputs[i].name, out.name) for i in role.tied for out in node.outputs if out.name)
    components, component_of = [], {}
    for names in sorted(nx.connected_components(ties), key=lambda c: min(order[n] for n in c)):
        members = sorted(names, key=order.__getitem__)
        widths = {int(by_name[n].shape[1]) for n in members}
        comp = Component(members, widths.pop() if len(widths) == 1 else None)
        if comp.channels is None:
            comp.fixed_reason = "the tensors they share a layout with disagree on the channel count"
        for name in members:
            kind, why = _source_kind(by_name[name], graph, roles)
            if kind == "fixed" and comp.fixed_reason is None:
                comp.fixed_reason = why
            elif kind == "concat":
                comp.concats.append(producer(by_name[name]))
            comp.read_padded |= any(roles[id(user)].kind != "opaque" for user in by_name[name].outputs)
            comp.written_padded |= kind == "free" and producer(by_name[name]).op in LINEAR_OPS
            component_of[name] = comp
        components.append(comp)

    # A Concat output takes its inputs' layouts, so resolve components in dependency order.
    deps = nx.DiGraph()
    deps.add_nodes_from(range(len(components)))
    index = {id(c): i for i, c in enumerate(components)}
    for i, comp in enumerate(components):
        for node in comp.concats:
            deps.add_edges_from((index[id(component_of[t.name])], i) for t in node.inputs)
    try:
        ordered = list(nx.lexicographical_topological_sort(deps))
    except nx.NetworkXUnfeasible:
        ordered = list(range(len(components)))
        for comp in components:
            if comp.concats and comp.fixed_reason is None:
                comp.fixed_reason = "Concats feed each other in a cycle"
    layouts = {}
    for i in ordered:
        comp = components[i]
        if comp.fixed_reason is None and comp.concats:
            derived = {concat_layout(node.inputs, layouts) for node in comp.concats}
            if len(derived) != 1:
                comp.fixed_reason = "Concats with different padded layouts meet in it"
            else:
                layout = derived.pop()
                # A width off the multiple is worth a Pad only if a consumer reads the padded channels.
                compact = concat == "compact" or (concat == "auto" and (
                    _round_up(comp.channels, multiple) < layout.width or (layout.width % multiple and comp.read_padded)))
                if not compact:
                    comp.layout = layout
                # else the prefix layout below: inputs sliced, Concat, then a Pad up to the multiple
        if comp.layout is None and comp.channels is not None:
            # A Split's part is padded by a Pad node: worth it only if a consumer reads it padded.
            useful = comp.written_padded or comp.read_padded
            width = _round_up(comp.channels, multiple) if useful and not comp.fixed_reason else comp.channels
            comp.layout = Layout(tuple(range(comp.channels)), width)
        for name in comp.members:
            layouts[name] = comp.layout or Layout.identity(int(by_name[name].shape[1]))
    return component_of, layouts


@register
class PadChannels(Pass):
    name = "pad-channels"
    kind = PassKind.FLOAT_PRESERVING

    @dataclass(frozen=True)
    class Options:
        multiple: int = 32
        concat: str = choices("auto", "interleave", "compact", default="auto")

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        multiple = self.options.multiple
        if multiple < 1:
            raise QccError(f"pad-channels: multiple must be positive, got {multiple}")
        graph = module.graph
        graph.toposort()
        nodes = list(graph.nodes)
        roles = {id(node): classify(node, module.opset) for node in nodes}
        component_of, layouts = plan_components(graph, roles, multiple, self.options.concat)
        macs_before = [_macs(n) for n in nodes if n.op in LINEAR_OPS]

        declined = self._remark_unaligned(graph, nodes, roles, component_of, layouts, ctx)
        rewriter = _Rewriter(module, dict(layouts))
        rewriter.split_graph_outputs()
        rewriter.resize_tensors()
        for node in nodes:
            rewriter.rewrite(node, roles[id(node)])
        modified = any(not layout.is_identity for layout in layouts.values())
        if modified:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()

        macs_after = [_macs(n) for n in nodes if n.op in LINEAR_OPS]
        known = [(b, a) for b, a in zip(macs_before, macs_after) if b is not None and a is not None]
        total = sum(b for b, _ in known)
        stats = dict(rewriter.stats, **{"convs-declined": declined})
        stats["extra-macs-pct"] = 100.0 * (sum(a for _, a in known) - total) / total if total else 0.0
        return PassResult(modified, stats)

    def _remark_unaligned(self, graph, nodes, roles, component_of, layouts, ctx) -> int:
        """Say why each linear layer that stays off the tile size was not (fully) padded; return how many
        were declined, not counting a layer whose only unpadded side is a graph input (the stem)."""
        declined = 0
        graph_inputs = {t.name for t in graph.inputs}
        for node in nodes:
            if node.op in LINEAR_OPS:
                reasons = self._unaligned(node, roles[id(node)], component_of, layouts)
                for reason in reasons:
                    ctx.remark(node, reason)
                stem = len(reasons) == 1 and reasons[0].startswith("input") and node.inputs[0].name in graph_inputs
                declined += bool(reasons) and not stem
        return declined

    def _unaligned(self, node, role: Role, component_of, layouts) -> list[str]:
        multiple = self.options.multiple
        counts = _linear_channels(node)
        if role.kind == "opaque":
            return [f"left alone: {role.reason}"] if counts is None or counts[0] % multiple or counts[1] % multiple else []
        x, y = node.inputs[0], node.outputs[0]
        reasons = []
        if layouts[y.name].width % multiple:
            reasons.append(f"output channels ({counts[1]}) not padded: {component_of[y.name].why_unaligned(multiple)}")
        if role.kind == "depthwise" or not counts[0] % multiple:
            return reasons
        if not role.takes_padded_input:
            reasons.append(f"input channels ({counts[0]}) not padded: Gemm with transA reads its input transposed")
        elif x.name not in layouts:
            reasons.append(f"input channels ({counts[0]}) not padded: the input's shape is unknown")
        elif layouts[x.name].width % multiple:
            reasons.append(f"input channels ({counts[0]}) not padded: {component_of[x.name].why_unaligned(multiple)}")
        return reasons
