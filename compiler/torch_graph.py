"""Run a (QDQ) ONNX graph in PyTorch, so that a quantized model can be differentiated.

Block reconstruction (passes/brecq.py) learns weight rounding through the quantized model's own
arithmetic, which needs gradients; onnxruntime has none. ``TorchGraph`` interprets the
onnx-graphsurgeon graph node by node with torch operations, in the semantics of onnxruntime's CPU
provider for the ops listed in ``OPS`` (float32; integer tensors for shapes). A graph with another op
is refused with ``UnsupportedOp`` naming it, so the caller can decline cleanly.

Quantization is simulated as insert-qdq writes it:

- an activation's QuantizeLinear -> DequantizeLinear pair is fake quantization,
  ``(clamp(round(x / s) + z, qmin, qmax) - z) * s`` with round-half-to-even as onnxruntime, and the
  straight-through estimator for the gradient (the rounding passes the gradient, the clamp stops it);
- a weight's DequantizeLinear of a stored integer constant yields either its stored value or, when
  the caller registers a ``WeightRounding`` for it, the differentiable AdaRound weight.

With ``quantize=False`` every Q/DQ pair is the identity and every weight its float value: the FP32
model through the same code, for reconstruction targets. ``drop`` (QDrop, Wei et al. 2022) keeps each
activation element's float value instead of its quantized one with that probability.
"""
from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs
import torch
import torch.nn.functional as F

from compiler.ir import const_value
from compiler.linear import conv_pads


class UnsupportedOp(Exception):
    def __init__(self, node: gs.Node, why: str):
        super().__init__(f"{node.op} node '{node.name}': {why}")
        self.node = node


def _int_range(zero_point: np.ndarray) -> tuple[int, int]:
    info = np.iinfo(zero_point.dtype)
    return int(info.min), int(info.max)


class FakeQuant:
    """One activation Q/DQ pair: scale, zero point and integer range (per tensor). With a ``log_scale``
    parameter u (shared by the pairs of one encoding), the scale is scale * exp(u) and learnable: the
    gradient reaches it as in LSQ (Esser et al. 2020); the zero point stays."""

    def __init__(self, scale: np.ndarray, zero_point: np.ndarray):
        self.scale = float(np.asarray(scale).reshape(-1)[0])
        self.zero_point = int(np.asarray(zero_point).reshape(-1)[0])
        self.qmin, self.qmax = _int_range(np.asarray(zero_point))
        self.log_scale: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # rounds half to even as onnxruntime; the gradient is the straight-through estimator inside the range
        if self.log_scale is None:
            return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, self.qmin, self.qmax)
        scale = self.scale * torch.exp(self.log_scale)
        zero_point = torch.tensor([float(self.zero_point)])
        return torch._fake_quantize_learnable_per_tensor_affine(x, scale, zero_point, self.qmin, self.qmax, 1.0)


class WeightRounding(torch.nn.Module):
    """AdaRound's weight: s * clip(floor(W / s) + h(V), qmin, qmax), h the rectified sigmoid
    (Nagel et al. 2020). V starts where h equals the fractional part, i.e. at nearest rounding."""

    ZETA, GAMMA = 1.1, -0.1

    def __init__(self, weight: np.ndarray, scale: np.ndarray, axis: int | None, qmin: int, qmax: int):
        super().__init__()
        shape = [1] * weight.ndim
        if axis is not None:
            shape[axis] = -1
        self.register_buffer("scale", torch.tensor(np.asarray(scale, dtype=np.float32).reshape(shape)))
        scaled = torch.tensor(weight.astype(np.float32)) / self.scale
        self.register_buffer("floor", torch.floor(scaled))
        self.register_buffer("nearest", torch.clamp(torch.round(scaled), qmin, qmax))
        rest = (scaled - self.floor).clamp(0.0, 1.0)
        p = ((rest - self.GAMMA) / (self.ZETA - self.GAMMA)).clamp(1e-6, 1 - 1e-6)
        self.v = torch.nn.Parameter(torch.log(p / (1 - p)))
        self.qmin, self.qmax = qmin, qmax
        self.soft = True

    def h(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.v) * (self.ZETA - self.GAMMA) + self.GAMMA, 0.0, 1.0)

    def codes(self) -> torch.Tensor:
        up = self.h() if self.soft else (self.v >= 0).to(self.v.dtype)
        return torch.clamp(self.floor + up, self.qmin, self.qmax)

    def forward(self) -> torch.Tensor:
        return self.codes() * self.scale

    def regularizer(self, beta: float) -> torch.Tensor:
        return (1 - torch.abs(2 * self.h() - 1) ** beta).sum()


def _ints(value) -> list[int]:
    return [int(v) for v in (value.tolist() if isinstance(value, torch.Tensor) else np.asarray(value).reshape(-1))]


def _conv_padding(node: gs.Node, x: torch.Tensor, kernel: list[int], strides: list[int], dilations: list[int]) -> list[int]:
    """ONNX pads [b1, b2, ..., e1, e2, ...] with auto_pad resolved."""
    begin, end = conv_pads(node.attrs, list(x.shape[2:]), kernel, strides, dilations)
    return list(begin) + list(end)


def _torch_pad(pads: list[int]) -> list[int]:
    """ONNX [b1, b2, e1, e2] -> F.pad's last-dimension-first [b2, e2, b1, e1]."""
    rank = len(pads) // 2
    out = []
    for axis in reversed(range(rank)):
        out += [pads[axis], pads[axis + rank]]
    return out


def _conv(node, x, w, b=None):
    rank = x.dim() - 2
    kernel = list(w.shape[2:])
    strides = list(node.attrs.get("strides", [1] * rank))
    dilations = list(node.attrs.get("dilations", [1] * rank))
    pads = _conv_padding(node, x, kernel, strides, dilations)
    if pads[:rank] == pads[rank:]:
        padding = pads[:rank]
    else:
        x, padding = F.pad(x, _torch_pad(pads)), [0] * rank
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[rank]
    return conv(x, w, b, strides, padding, dilations, int(node.attrs.get("group", 1)))


def _conv_transpose(node, x, w, b=None):
    rank = x.dim() - 2
    if "output_shape" in node.attrs or node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
        raise UnsupportedOp(node, "output_shape / auto_pad")
    strides = list(node.attrs.get("strides", [1] * rank))
    dilations = list(node.attrs.get("dilations", [1] * rank))
    pads = list(node.attrs.get("pads", [0] * (2 * rank)))
    if pads[:rank] != pads[rank:]:
        raise UnsupportedOp(node, "asymmetric pads")
    output_padding = list(node.attrs.get("output_padding", [0] * rank))
    conv = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[rank]
    return conv(x, w, b, strides, pads[:rank], output_padding, int(node.attrs.get("group", 1)), dilations)


def _gemm(node, a, b, c=None):
    if node.attrs.get("transA", 0):
        a = a.transpose(0, 1)
    if node.attrs.get("transB", 0):
        b = b.transpose(0, 1)
    y = float(node.attrs.get("alpha", 1.0)) * (a @ b)
    return y if c is None else y + float(node.attrs.get("beta", 1.0)) * c


def _pool(node, x, kind: str):
    rank = x.dim() - 2
    kernel = list(node.attrs["kernel_shape"])
    strides = list(node.attrs.get("strides", [1] * rank))
    dilations = list(node.attrs.get("dilations", [1] * rank))
    pads = _conv_padding(node, x, kernel, strides, dilations)
    ceil = bool(node.attrs.get("ceil_mode", 0))
    if kind == "max":
        if pads[:rank] != pads[rank:]:
            x, pads = F.pad(x, _torch_pad(pads), value=-math.inf), [0] * (2 * rank)
        pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[rank]
        return pool(x, kernel, strides, pads[:rank], dilations, ceil_mode=ceil)
    if any(d != 1 for d in dilations) or pads[:rank] != pads[rank:]:
        raise UnsupportedOp(node, "dilated or asymmetrically padded AveragePool")
    pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[rank]
    return pool(x, kernel, strides, pads[:rank], ceil_mode=ceil,
                count_include_pad=bool(node.attrs.get("count_include_pad", 0)))


def _axes(node, inputs, index: int = 1):
    if len(inputs) > index and inputs[index] is not None:
        return _ints(inputs[index])
    return list(node.attrs["axes"]) if "axes" in node.attrs else None


def _reshape(node, x, shape):
    dims = _ints(shape)
    if not node.attrs.get("allowzero", 0):
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def _slice(node, x, starts, ends, axes=None, steps=None):
    starts, ends = _ints(starts), _ints(ends)
    axes = _ints(axes) if axes is not None else list(range(len(starts)))
    steps = _ints(steps) if steps is not None else [1] * len(starts)
    index = [slice(None)] * x.dim()
    for start, end, axis, step in zip(starts, ends, axes, steps):
        if step < 0:
            raise UnsupportedOp(node, "negative step")
        size = x.shape[axis]
        start = max(0, min(size, start + size if start < 0 else start))
        end = max(0, min(size, end + size if end < 0 else end))
        index[axis] = slice(start, end, step)
    return x[tuple(index)]


def _resize(node, x, roi=None, scales=None, sizes=None):
    mode = node.attrs.get("mode", "nearest")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    transform = node.attrs.get("coordinate_transformation_mode", "half_pixel")
    transform = transform.decode() if isinstance(transform, bytes) else transform
    if sizes is not None and sizes.numel():
        size = _ints(sizes)[2:]
    else:
        factors = [float(s) for s in scales.reshape(-1).tolist()]
        if factors[:2] != [1.0, 1.0]:
            raise UnsupportedOp(node, "resizing batch or channels")
        size = [int(math.floor(d * f)) for d, f in zip(x.shape[2:], factors[2:])]
    if mode == "nearest":
        if any(out % inp for out, inp in zip(size, x.shape[2:])):
            raise UnsupportedOp(node, "nearest resize by a non-integer factor")
        return F.interpolate(x, size=size, mode="nearest")
    if mode == "linear" and transform in ("half_pixel", "pytorch_half_pixel", "align_corners") and x.dim() == 4:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=transform == "align_corners")
    raise UnsupportedOp(node, f"mode {mode} with {transform}")


def _layer_norm(node, x, scale, bias=None):
    axis = int(node.attrs.get("axis", -1))
    axis = axis % x.dim()
    dims = list(range(axis, x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    y = (x - mean) / torch.sqrt(var + float(node.attrs.get("epsilon", 1e-5))) * scale
    return y if bias is None else y + bias


def _batch_norm(node, x, scale, bias, mean, var):
    shape = [1, -1] + [1] * (x.dim() - 2)
    inv = scale / torch.sqrt(var + float(node.attrs.get("epsilon", 1e-5)))
    return (x - mean.reshape(shape)) * inv.reshape(shape) + bias.reshape(shape)


def _reduce(node, inputs, fn):
    axes = _axes(node, inputs)
    keep = bool(node.attrs.get("keepdims", 1))
    x = inputs[0]
    if not axes:
        axes = list(range(x.dim()))
    return fn(x, dim=axes, keepdim=keep)


def _div(a, b):
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


def _clip(node, x, lo=None, hi=None):
    lo = float(lo) if lo is not None else node.attrs.get("min")
    hi = float(hi) if hi is not None else node.attrs.get("max")
    return torch.clamp(x, lo, hi)


def _split(node, inputs):
    x, axis = inputs[0], int(node.attrs.get("axis", 0))
    sizes = _ints(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else node.attrs.get("split")
    if sizes is None:
        count = len(node.outputs)
        sizes = [x.shape[axis] // count] * count
    return list(torch.split(x, list(sizes), dim=axis))


def _pad(node, x, pads=None, value=None, axes=None):
    if axes is not None:
        raise UnsupportedOp(node, "Pad with axes")
    pads = _ints(pads) if pads is not None else list(node.attrs["pads"])
    mode = node.attrs.get("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    order = _torch_pad(pads)
    while len(order) > 2 and order[-2:] == [0, 0]:
        order = order[:-2]  # F.pad's reflect and replicate pad trailing dimensions only
    if mode == "constant":
        return F.pad(x, order, value=float(value) if value is not None and value.numel() else 0.0)
    return F.pad(x, order, mode={"reflect": "reflect", "edge": "replicate"}[mode])


def _flatten(x: torch.Tensor, axis: int) -> torch.Tensor:
    axis = axis + x.dim() if axis < 0 else axis
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


def _gather(x: torch.Tensor, indices: torch.Tensor, axis: int) -> torch.Tensor:
    """ONNX Gather: negative indices count from the end; the result's axis becomes the indices' shape."""
    taken = torch.index_select(x, axis, indices.reshape(-1) % x.shape[axis])
    return taken.reshape(list(x.shape[:axis]) + list(indices.shape) + list(x.shape[axis + 1:]))


def _tensor(value) -> torch.Tensor:
    array = np.asarray(value)
    if array.dtype == np.float64:
        array = array.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(array).copy())


_ELEMENTWISE = {
    "Add": lambda n, a, b: a + b, "Sub": lambda n, a, b: a - b, "Mul": lambda n, a, b: a * b,
    "Div": lambda n, a, b: _div(a, b), "Pow": lambda n, a, b: torch.pow(a, b),
    "Relu": lambda n, x: F.relu(x), "Sigmoid": lambda n, x: torch.sigmoid(x), "Tanh": lambda n, x: torch.tanh(x),
    "Erf": lambda n, x: torch.erf(x), "Sqrt": lambda n, x: torch.sqrt(x), "Exp": lambda n, x: torch.exp(x),
    "Neg": lambda n, x: -x, "Abs": lambda n, x: torch.abs(x), "Reciprocal": lambda n, x: 1.0 / x,
    "Identity": lambda n, x: x,
    "LeakyRelu": lambda n, x: F.leaky_relu(x, float(n.attrs.get("alpha", 0.01))),
    "PRelu": lambda n, x, slope: torch.where(x >= 0, x, x * slope),
    "HardSigmoid": lambda n, x: torch.clamp(float(n.attrs.get("alpha", 0.2)) * x + float(n.attrs.get("beta", 0.5)), 0, 1),
    "HardSwish": lambda n, x: x * torch.clamp(x / 6.0 + 0.5, 0, 1),
    "Softmax": lambda n, x: torch.softmax(x, dim=int(n.attrs.get("axis", -1))),
    "Clip": _clip,
    "Conv": _conv, "ConvTranspose": _conv_transpose, "Gemm": _gemm,
    "MatMul": lambda n, a, b: torch.matmul(a, b),
    "GlobalAveragePool": lambda n, x: x.mean(dim=list(range(2, x.dim())), keepdim=True),
    "GlobalMaxPool": lambda n, x: x.amax(dim=list(range(2, x.dim())), keepdim=True),
    "MaxPool": lambda n, x: _pool(n, x, "max"), "AveragePool": lambda n, x: _pool(n, x, "avg"),
    "Reshape": _reshape, "Slice": _slice, "Resize": _resize, "Pad": _pad,
    "Flatten": lambda n, x: _flatten(x, int(n.attrs.get("axis", 1))),
    "Transpose": lambda n, x: x.permute(list(n.attrs["perm"]) if "perm" in n.attrs else list(reversed(range(x.dim())))),
    "Shape": lambda n, x: torch.tensor(list(x.shape), dtype=torch.int64),
    "Gather": lambda n, x, i: _gather(x, i, int(n.attrs.get("axis", 0)) % x.dim()),
    "Cast": lambda n, x: x.to(torch.float32) if int(n.attrs["to"]) == 1 else x.to(torch.int64),
    "Expand": lambda n, x, shape: x * torch.ones(_ints(shape), dtype=x.dtype),
    "LayerNormalization": _layer_norm, "BatchNormalization": _batch_norm,
    "InstanceNormalization": lambda n, x, scale, bias: F.instance_norm(x, weight=scale, bias=bias,
                                                                        eps=float(n.attrs.get("epsilon", 1e-5))),
    "Gelu": lambda n, x: F.gelu(x, approximate="tanh" if n.attrs.get("approximate") in ("tanh", b"tanh") else "none"),
}

_VARIADIC = {
    "Concat": lambda n, xs: torch.cat(xs, dim=int(n.attrs["axis"])),
    "Sum": lambda n, xs: sum(xs[1:], xs[0]),
    "Unsqueeze": lambda n, xs: _unsqueeze(n, xs),
    "Squeeze": lambda n, xs: _squeeze(n, xs),
    "ReduceMean": lambda n, xs: _reduce(n, xs, torch.mean),
    "ReduceSum": lambda n, xs: _reduce(n, xs, torch.sum),
    "ReduceMax": lambda n, xs: _reduce(n, xs, torch.amax),
}

_MULTI_OUTPUT = {"Split": _split}


def _unsqueeze(node, inputs):
    x = inputs[0]
    axes = sorted(a % (x.dim() + len(_axes(node, inputs))) for a in _axes(node, inputs))
    for axis in axes:
        x = x.unsqueeze(axis)
    return x


def _squeeze(node, inputs):
    x, axes = inputs[0], _axes(node, inputs)
    if axes is None:
        return x.squeeze()
    for axis in sorted((a % x.dim() for a in axes), reverse=True):
        x = x.squeeze(axis)
    return x


OPS = set(_ELEMENTWISE) | set(_VARIADIC) | set(_MULTI_OUTPUT) | {"QuantizeLinear", "DequantizeLinear", "Constant"}


class TorchGraph:
    """The graph's nodes in topological order as torch operations; see the module docstring.

    ``run(values, nodes)`` evaluates ``nodes`` (a slice of ``self.nodes``) given the tensors they read
    in ``values`` (name -> torch tensor) and returns ``values`` with their outputs added."""

    def __init__(self, graph: gs.Graph):
        graph.toposort()
        self.constants: dict[str, torch.Tensor] = {}
        self.fake_quants: dict[str, FakeQuant] = {}       # Q node output name -> its fake quantization
        self.stored_weights: dict[str, gs.Node] = {}      # DQ output name -> DQ node of a stored constant
        self.nodes = []                                   # the nodes that compute: no constants, no stored DQs
        for node in graph.nodes:
            if node.op not in OPS or (node.domain or "") not in ("", "ai.onnx", "com.microsoft"):
                raise UnsupportedOp(node, "not supported by the torch simulation")
            for tensor in node.inputs:
                value = const_value(tensor) if tensor.name else None
                if value is not None and tensor.name not in self.constants:
                    self.constants[tensor.name] = _tensor(value)
            if node.op == "Constant":
                self.constants[node.outputs[0].name] = _tensor(const_value(node.outputs[0]))
            elif node.op == "DequantizeLinear" and const_value(node.inputs[0]) is not None:
                self.stored_weights[node.outputs[0].name] = node
            else:
                if node.op == "QuantizeLinear":
                    self.fake_quants[node.outputs[0].name] = FakeQuant(const_value(node.inputs[1]), _zero_point(node))
                self.nodes.append(node)
        self.roundings: dict[str, WeightRounding] = {}   # stored DQ output name -> learnable weight
        self.float_values: dict[str, torch.Tensor] = {}  # stored DQ output name -> its FP32 value (quantize=False)
        self.quantize = True
        self.drop = 0.0
        self.batched = False  # samples stacked on axis 0: a Reshape to a leading 1 keeps the batch instead

    def run(self, values: dict, nodes: list[gs.Node] | None = None) -> dict:
        for node in self.nodes if nodes is None else nodes:
            self._eval(node, values)
        return values

    def _read(self, tensor, values):
        if not tensor.name:
            return None
        if tensor.name in values:
            return values[tensor.name]
        if tensor.name in self.stored_weights:
            return self._constant_dequantized(tensor.name)
        return self.constants[tensor.name]

    def _eval(self, node: gs.Node, values: dict) -> None:
        out = node.outputs[0].name
        if node.op == "QuantizeLinear":
            values[out] = self._read(node.inputs[0], values)  # the float input; its DQ quantizes it
            return
        if node.op == "DequantizeLinear":
            values[out] = self._fake_quantized(node, values)
            return
        inputs = [self._read(t, values) for t in node.inputs]
        if node.op in _MULTI_OUTPUT:
            for tensor, value in zip(node.outputs, _MULTI_OUTPUT[node.op](node, inputs)):
                values[tensor.name] = value
            return
        if node.op in _VARIADIC:
            values[out] = _VARIADIC[node.op](node, inputs)
            return
        while inputs and inputs[-1] is None:
            inputs.pop()
        if node.op == "Reshape" and self.batched:
            inputs[1] = _batched_shape(inputs[1])
        values[out] = _ELEMENTWISE[node.op](node, *inputs)

    def _constant_dequantized(self, name: str) -> torch.Tensor:
        if not self.quantize and name in self.float_values:
            return self.float_values[name]
        if name in self.roundings:
            return self.roundings[name]()
        return self._stored_dequantized(self.stored_weights[name])

    def _fake_quantized(self, node: gs.Node, values: dict) -> torch.Tensor:
        source = node.inputs[0].name
        x = values[source]
        if not self.quantize:
            return x
        quantized = self.fake_quants[source](x)
        if self.drop > 0.0:
            keep_float = torch.rand_like(x) < self.drop
            return torch.where(keep_float, x, quantized)
        return quantized

    def _stored_dequantized(self, node: gs.Node) -> torch.Tensor:
        name = node.outputs[0].name
        if name not in self.constants:
            # float32 throughout, as DequantizeLinear computes it
            stored = const_value(node.inputs[0]).astype(np.float32)
            scale = const_value(node.inputs[1]).astype(np.float32)
            zero = np.asarray(_zero_point(node)).astype(np.float32)
            if scale.size > 1:
                shape = [1] * stored.ndim
                shape[int(node.attrs.get("axis", 1)) % stored.ndim] = -1
                scale, zero = scale.reshape(shape), zero.reshape(shape)
            self.constants[name] = _tensor((stored - zero) * scale)
        return self.constants[name]


def _batched_shape(shape: torch.Tensor) -> torch.Tensor:
    """A Reshape target [1, d1, ...] without -1, written for one sample, as [-1, d1, ...]."""
    dims = _ints(shape)
    if dims and dims[0] == 1 and -1 not in dims:
        return torch.tensor([-1] + dims[1:], dtype=torch.int64)
    return shape


def _zero_point(node: gs.Node) -> np.ndarray:
    if len(node.inputs) > 2 and node.inputs[2].name:
        return const_value(node.inputs[2])
    return np.zeros(1, dtype=np.uint8)
