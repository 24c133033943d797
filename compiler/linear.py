"""Linear layers (Conv, Gemm, MatMul with a constant weight) seen as matrices, for the passes that
rewrite weights and biases (cle, bias-correction, adaround).

A layer's weight is viewed as ``M[g, o, k]`` (group, output channel within the group, reduction
index) and its input as patches ``X[p, g, k]`` (one row per output position), so that

    y[p, g*O/g + o] = sum_k M[g, o, k] * X[p, g, k]  (+ bias)

for every Conv (any group count, strides, dilations, explicit or SAME pads), for Gemm
(``alpha = 1``, ``transA = 0``) and for MatMul with a 2-D constant right operand.

A layer's per-output-channel bias may sit in the node (Conv input 2, Gemm input C) or, as
paddle2onnx writes it, in an ``Add`` of a per-channel constant right after the layer:
``BiasSite`` reads and writes either form.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from compiler.encoding import Encoding, weight_encoding
from compiler.ir import const_value, make_const
from compiler.patterns import has_single_consumer

LINEAR_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})  # the ops whose weight makes them a layer


def channel_constant(value: np.ndarray, channels: int, rank: int, channel_axis: int = 1) -> np.ndarray | None:
    """``value`` as one float64 per channel if, broadcast against a rank-``rank`` tensor, it varies at most
    along ``channel_axis`` (axis 1 of NCHW; a Gemm's columns are axis 1 of rank 2); else None."""
    if value.ndim > rank:
        return None
    aligned = (1,) * (rank - value.ndim) + value.shape
    if any(d != 1 for i, d in enumerate(aligned) if i != channel_axis) or aligned[channel_axis] not in (1, channels):
        return None
    return np.broadcast_to(np.asarray(value, np.float64).reshape(-1), (channels,)).copy()


@dataclass(eq=False)  # identity semantics: layers key dictionaries
class LinearLayer:
    node: gs.Node
    groups: int = 1

    @property
    def weight_tensor(self):
        return self.node.inputs[1]

    @property
    def weight(self) -> np.ndarray:
        return const_value(self.weight_tensor)

    @property
    def is_conv(self) -> bool:
        return self.node.op == "Conv"

    @property
    def transposed(self) -> bool:
        """Weight stored as [K, O] (MatMul, Gemm with transB = 0) rather than [O, K, ...]."""
        return self.node.op == "MatMul" or (self.node.op == "Gemm" and not self.node.attrs.get("transB", 0))

    @property
    def axis(self) -> int:
        """The weight's output-channel axis."""
        return 1 if self.transposed else 0

    def quant_axis(self, per_channel: bool) -> int | None:
        """The axis insert-qdq quantizes this weight along (None: per tensor; QNN has no per-channel MatMul)."""
        return self.axis if per_channel and self.node.op != "MatMul" else None

    @property
    def out_channels(self) -> int:
        return self.weight.shape[self.axis]

    @property
    def in_channels(self) -> int:
        """Channels of the input this layer reduces over (Conv: C_in; Gemm/MatMul: K)."""
        return self.weight.shape[1] * self.groups if self.is_conv else self.weight.shape[1 - self.axis]

    def input_channel_view(self, weight: np.ndarray) -> np.ndarray:
        """[g, O/g, C_in/g, taps] view of a weight of this layer's shape: axes (0, 2) enumerate input channels."""
        matrix = self.to_matrix(weight)
        return matrix.reshape(matrix.shape[0], matrix.shape[1], self.in_channels // self.groups, -1)

    def to_matrix(self, weight: np.ndarray) -> np.ndarray:
        """[g, O/g, K] view of a weight of this layer's shape."""
        w = weight.T if self.transposed else weight
        return w.reshape(self.groups, w.shape[0] // self.groups, -1)

    def from_matrix(self, matrix: np.ndarray) -> np.ndarray:
        shape = self.weight.shape
        if self.transposed:
            return matrix.reshape(shape[1], shape[0]).T.astype(self.weight.dtype)
        return matrix.reshape(shape).astype(self.weight.dtype)

    def encoding(self, module, bits: int, per_channel: bool) -> Encoding:
        """The encoding insert-qdq will give this weight: the one in ``module.encodings`` if it fits
        (AdaRound, a loaded file), else symmetric ``bits``-bit per channel (or per tensor)."""
        axis = self.quant_axis(per_channel)
        existing = module.encodings.get(self.weight_tensor.name)
        if existing is not None and existing.axis == axis and len(existing.scale) == (self.weight.shape[axis] if axis is not None else 1):
            return existing
        return weight_encoding(self.weight, bits, axis)

    # --- input patches -------------------------------------------------------------------------

    def _conv_geometry(self, x_shape) -> tuple:
        attrs = self.node.attrs
        kernel = self.weight.shape[2:]
        strides = list(attrs.get("strides", [1] * len(kernel)))
        dilations = list(attrs.get("dilations", [1] * len(kernel)))
        pads_begin, pads_end = conv_pads(attrs, x_shape[2:], kernel, strides, dilations)
        return kernel, strides, dilations, pads_begin, pads_end

    def has_padding(self) -> bool:
        if not self.is_conv:
            return False
        if self.node.attrs.get("auto_pad", "NOTSET") in ("SAME_UPPER", "SAME_LOWER"):
            return True
        return any(self.node.attrs.get("pads", []))

    def _windows(self, x: np.ndarray) -> np.ndarray:
        """[N, C, Ho, Wo, kh, kw] strided view of the zero-padded input."""
        kernel, strides, dilations, begin, end = self._conv_geometry(x.shape)
        padded = np.pad(x, [(0, 0), (0, 0)] + list(zip(begin, end)))
        span = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
        windows = np.lib.stride_tricks.sliding_window_view(padded, span, axis=(2, 3))
        return windows[:, :, ::strides[0], ::strides[1], ::dilations[0], ::dilations[1]]

    def patches(self, x: np.ndarray, max_positions: int | None = None, rng: np.random.Generator | None = None) -> np.ndarray:
        """Input rows [P, g, K] for the layer's input ``x``; at most ``max_positions`` rows, drawn with ``rng``."""
        if self.is_conv:
            windows = self._windows(x)
            n, c, ho, wo = windows.shape[:4]
            positions = n * ho * wo
            if max_positions is None or positions <= max_positions:
                rows = windows.transpose(0, 2, 3, 1, 4, 5).reshape(positions, c, -1)
            else:
                chosen = np.sort(rng.choice(positions, max_positions, replace=False))
                sample, rest = np.divmod(chosen, ho * wo)
                row, col = np.divmod(rest, wo)
                rows = windows[sample, :, row, col].reshape(len(chosen), c, -1)
            return rows.reshape(rows.shape[0], self.groups, -1)
        rows = x.reshape(-1, x.shape[-1])
        if max_positions is not None and len(rows) > max_positions:
            rows = rows[np.sort(rng.choice(len(rows), max_positions, replace=False))]
        return rows.reshape(len(rows), 1, -1)

    def patch_mean(self, x: np.ndarray) -> np.ndarray:
        """Mean input row [g, K] over every output position of ``x`` (zero padding included)."""
        if self.is_conv:
            # A tap's sum is a strided rectangle of the unpadded input (padding adds zeros): sum the columns
            # each kernel column reads once, then the rows each kernel row reads, instead of averaging a
            # slice per tap or a sliding-window view, both slower (docs/measurements.md).
            kernel, strides, dilations, begin, end = self._conv_geometry(x.shape)
            ho, wo = [(size + b + e - (k - 1) * d - 1) // s + 1
                      for size, b, e, k, d, s in zip(x.shape[2:], begin, end, kernel, dilations, strides)]
            col_sums = [x[:, :, :, _valid(j * dilations[1] - begin[1], strides[1], wo, x.shape[3])]
                        .sum(axis=(0, 3), dtype=np.float64) for j in range(kernel[1])]  # each [C, H]
            taps = np.empty((x.shape[1],) + tuple(kernel))
            for i in range(kernel[0]):
                rows = _valid(i * dilations[0] - begin[0], strides[0], ho, x.shape[2])
                for j in range(kernel[1]):
                    taps[:, i, j] = col_sums[j][:, rows].sum(axis=1)
            return (taps / (x.shape[0] * ho * wo)).reshape(self.groups, -1)
        return x.reshape(-1, x.shape[-1]).mean(axis=0, dtype=np.float64).reshape(1, -1)


def _valid(first: int, step: int, count: int, size: int) -> slice:
    """The indices first + step * k (k < count) that fall inside [0, size), as a slice."""
    skip = max(0, (step - 1 - first) // step)  # k below this reads the leading padding
    last = min(count - 1, (size - 1 - first) // step)  # k above this reads the trailing padding
    if last < skip:
        return slice(0, 0)
    return slice(first + step * skip, first + step * last + 1, step)


def conv_pads(attrs: dict, spatial, kernel, strides, dilations) -> tuple[list[int], list[int]]:
    """A Conv's or pool's padding at the start and end of each spatial axis, ``auto_pad`` resolved for an
    input of spatial size ``spatial``."""
    auto_pad = attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for size, k, s, d in zip(spatial, kernel, strides, dilations):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small, large = total // 2, total - total // 2
            begin.append(small if auto_pad == "SAME_UPPER" else large)
            end.append(large if auto_pad == "SAME_UPPER" else small)
        return begin, end
    if auto_pad == "VALID":
        return [0] * len(kernel), [0] * len(kernel)
    pads = list(attrs.get("pads", [0] * 2 * len(kernel)))
    return pads[:len(kernel)], pads[len(kernel):]


def linear_layer(node: gs.Node) -> tuple[LinearLayer | None, str]:
    """The layer view of ``node``, or (None, why it has none)."""
    if node.op not in ("Conv", "Gemm", "MatMul"):
        return None, f"{node.op} is not a linear layer"
    if len(node.inputs) < 2 or const_value(node.inputs[1]) is None:
        return None, "weight is not a constant"
    weight = const_value(node.inputs[1])
    if not np.issubdtype(weight.dtype, np.floating):
        return None, f"weight has dtype {weight.dtype}"
    if node.op == "Conv":
        if weight.ndim != 4:
            return None, f"only 2-D convolutions are handled (weight rank {weight.ndim})"
        groups = int(node.attrs.get("group", 1))
        if weight.shape[0] % groups:
            return None, "output channels not divisible by group"
        return LinearLayer(node, groups), ""
    if weight.ndim != 2:
        return None, f"weight rank {weight.ndim} (2 expected)"
    if node.op == "Gemm" and (node.attrs.get("transA", 0) or float(node.attrs.get("alpha", 1.0)) != 1.0):
        return None, "Gemm with transA or alpha != 1"
    return LinearLayer(node), ""


def uses(graph: gs.Graph, tensor) -> int:
    """How many node inputs read ``tensor`` (a weight read twice cannot be rewritten for one reader).

    graphsurgeon lists a consumer once per input slot in ``tensor.outputs``, and nodes leave a graph only
    disconnected (cleanup clears their inputs), so the count needs no scan of ``graph``'s nodes."""
    return len(tensor.outputs)


def set_input_const(graph: gs.Graph, node: gs.Node, index: int, values: np.ndarray,
                    tensor_names: set | None = None) -> None:
    """Give ``node`` input ``index`` the constant ``values``: in place when the tensor is an initializer
    only this node reads (its name, and any encoding keyed by it, stays), else as a new initializer
    (named as ``compiler.ir.make_const`` names, with the same optional ``tensor_names``)."""
    tensor = node.inputs[index] if index < len(node.inputs) else None
    values = np.ascontiguousarray(values)
    if isinstance(tensor, gs.Constant) and uses(graph, tensor) == 1:
        tensor.values = values  # a new array: clones made before the pass keep the old one
        return
    hint = tensor.name if tensor is not None and tensor.name else f"{node.name or node.outputs[0].name}_bias"
    new = make_const(graph, hint, values, tensor_names)
    if tensor is None:
        while len(node.inputs) < index:
            node.inputs.append(gs.Variable.empty())
        node.inputs.append(new)
    else:
        node.inputs[index] = new


@dataclass
class BiasSite:
    """Where a layer's per-output-channel bias lives: a node input, or a constant of a following Add."""
    node: gs.Node          # the layer, or the Add
    index: int             # input index of the constant
    shape: tuple           # shape a per-channel value is written with (the constant's own, if per-channel)
    channels: int

    def read(self) -> np.ndarray:
        """The bias, one value per channel, in float32 (float64 for a float64 model)."""
        tensor = self.node.inputs[self.index] if self.index < len(self.node.inputs) else None
        value = const_value(tensor) if tensor is not None and tensor.name else None
        if value is None:
            return np.zeros(self.channels, dtype=np.result_type(self.dtype, np.float32))
        return np.broadcast_to(value.reshape(-1), (self.channels,)).astype(np.result_type(value.dtype, np.float32))

    @property
    def dtype(self) -> np.dtype:
        """The model's float type here: the bias constant's, else the layer weight's (a Conv or Gemm without bias)."""
        tensor = self.node.inputs[self.index] if self.index < len(self.node.inputs) else None
        value = const_value(tensor) if tensor is not None and tensor.name else None
        return (value if value is not None else const_value(self.node.inputs[1])).dtype

    def write(self, graph: gs.Graph, bias: np.ndarray, tensor_names: set | None = None) -> None:
        set_input_const(graph, self.node, self.index, bias.astype(self.dtype).reshape(self.shape), tensor_names)

    @property
    def output(self):
        """The tensor that carries the biased result."""
        return self.node.outputs[0]


def bias_add(graph: gs.Graph, layer: LinearLayer) -> tuple[gs.Node, int] | None:
    """A following ``Add(layer output, c)`` whose constant c is one value per output channel (or one value)."""
    out = layer.node.outputs[0]
    if not has_single_consumer(graph, out):
        return None
    add = out.outputs[0]
    if add.op != "Add" or len(add.inputs) != 2:
        return None
    index = 1 if add.inputs[0] is out else 0
    if add.inputs[1 - index] is not out:
        return None
    value = const_value(add.inputs[index])
    if value is None or out.shape is None:
        return None
    channel_axis_from_end = len(out.shape) - 2 if layer.is_conv else 0  # NCHW: C is axis 1; Gemm/MatMul: last
    shape = list(value.shape)
    if value.size == 1:
        return add, index
    if len(shape) <= channel_axis_from_end or shape[len(shape) - 1 - channel_axis_from_end] != layer.out_channels:
        return None
    if any(d != 1 for i, d in enumerate(shape) if i != len(shape) - 1 - channel_axis_from_end):
        return None
    return add, index


def bias_site(graph: gs.Graph, layer: LinearLayer) -> BiasSite | None:
    """The layer's bias: in the node if it has one, else a following per-channel Add, else a new node input
    (Conv, Gemm); None for a MatMul without a following Add."""
    node, channels = layer.node, layer.out_channels
    has_input = len(node.inputs) > 2 and node.inputs[2].name
    if has_input:
        value = const_value(node.inputs[2])
        if value is None or (value.size not in (1, channels)):
            return None
        if node.op == "Gemm" and value.ndim == 2 and value.shape[0] != 1:
            return None  # a per-row C is not a bias
        if node.op == "Gemm" and float(node.attrs.get("beta", 1.0)) != 1.0:
            return None
        return BiasSite(node, 2, tuple(value.shape) if value.size == channels else (channels,), channels)
    found = bias_add(graph, layer)
    if found is not None:
        add, index = found
        value = const_value(add.inputs[index])
        if value.size == channels:
            return BiasSite(add, index, tuple(value.shape), channels)
        rank = len(node.outputs[0].shape)
        return BiasSite(add, index, (channels,) + (1,) * (rank - 2) if layer.is_conv else (channels,), channels)
    if node.op in ("Conv", "Gemm"):
        return BiasSite(node, 2, (channels,), channels)
    return None


def channel_vector(value: np.ndarray, channels: int) -> np.ndarray:
    return np.broadcast_to(np.asarray(value, np.float64).reshape(-1), (channels,))


def out_channels(layer: gs.Node, weight: np.ndarray) -> int:
    if layer.op == "Conv":
        return weight.shape[0]
    if layer.op == "ConvTranspose":
        return weight.shape[1] * int(layer.attrs.get("group", 1))
    if layer.op == "Gemm" and layer.attrs.get("transB", 0):
        return weight.shape[0]
    return weight.shape[1]


def output_rank(layer: gs.Node, weight: np.ndarray) -> int:
    return weight.ndim if layer.op in ("Conv", "ConvTranspose") else 2


def scale_weight(layer: gs.Node, weight: np.ndarray, s: np.ndarray) -> np.ndarray:
    """The weight with output channel o multiplied by s[o]."""
    if layer.op == "Conv":
        return weight * s.reshape((-1,) + (1,) * (weight.ndim - 1))
    if layer.op == "ConvTranspose":
        groups = int(layer.attrs.get("group", 1))
        c_in, per_group = weight.shape[:2]
        grouped = weight.reshape((groups, c_in // groups, per_group) + weight.shape[2:])
        factor = s.reshape((groups, 1, per_group) + (1,) * (weight.ndim - 2))
        return (grouped * factor).reshape(weight.shape)
    if layer.op == "Gemm" and layer.attrs.get("transB", 0):
        return weight * s[:, None]
    return weight * s[None, :]


def layer_problem(layer: gs.Node) -> str:
    """Why ``layer`` cannot absorb a per-channel scale on its output ('' if it can)."""
    if layer.op not in LINEAR_OPS:
        return f"its producer is a {layer.op}, not a Conv, ConvTranspose, Gemm or MatMul"
    weight = const_value(layer.inputs[1]) if len(layer.inputs) > 1 else None
    if weight is None:
        return f"the {layer.op}'s weight is not a constant"
    if not np.issubdtype(weight.dtype, np.floating):
        return f"the {layer.op}'s weight has dtype {weight.dtype}"
    if layer.op in ("Conv", "ConvTranspose"):
        if weight.ndim < 3:
            return f"the {layer.op}'s weight has rank {weight.ndim}"
        if layer.op == "ConvTranspose" and weight.shape[0] % int(layer.attrs.get("group", 1)):
            return "the ConvTranspose's input channels are not divisible by its group count"
        if len(layer.inputs) > 2 and layer.inputs[2].name and const_value(layer.inputs[2]) is None:
            return f"the {layer.op}'s bias is not a constant"
        return ""
    if weight.ndim != 2:
        return f"the {layer.op}'s weight has rank {weight.ndim}"
    if layer.op == "MatMul":
        a = layer.inputs[0].shape
        if a is None or len(a) != 2:
            return "the MatMul's output is not of rank 2 (BatchNormalization would normalise another axis)"
        return ""
    if len(layer.inputs) > 2 and layer.inputs[2].name and const_value(layer.inputs[2]) is None:
        return "the Gemm's C is not a constant"
    return ""
