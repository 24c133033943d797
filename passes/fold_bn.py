"""Fold BatchNormalization into the preceding Conv, ConvTranspose, Gemm or MatMul, else rewrite it as Mul+Add.

In inference, BatchNormalization is a per-channel affine map on axis 1:

    y = (x - mean) / sqrt(var + eps) * gamma + beta = s * x + t
    s = gamma / sqrt(var + eps)        t = beta - mean * s

A linear layer followed by it absorbs s into its weights' output channels and s, t into its bias:

    %c = Conv(%x, @w, @b)                     %y = Conv(%x, @w', @b')     w'[o] = s[o] w[o]    b' = s b + t
    %y = BatchNormalization(%c, ...)    ->

The output-channel axis differs per layer: Conv weights are [C_out, C_in/g, k...] (axis 0);
ConvTranspose weights are [C_in, C_out/g, k...], so output channel o = j * C_out/g + i is axis 1
within group j; Gemm's B is [N, K] with transB=1 (axis 0), else [K, N] (axis 1); MatMul's constant
right operand is [K, N] (axis 1, output of rank 2 only: BatchNormalization normalises axis 1).
Gemm's C becomes C s + t / beta. paddle2onnx writes a layer's bias as a separate
``Add(layer, per-channel constant)``; that constant c becomes c s + t and the Add stays. A MatMul
without such an Add gets one (``Add(matmul, t)``).

Where no layer can absorb the BatchNormalization — its input is a graph input, feeds other nodes
too, or comes from another op (e.g. an Add of two tensors) — it becomes

    %y = BatchNormalization(%x, ...)    ->    %m = Mul(%x, @s)   %y = Add(%m, @t)

with s, t shaped [C, 1, ..., 1] (one value per channel of axis 1), so no BatchNormalization survives.
A weight read by several nodes is folded into a copy, never in place. Old opsets' ``spatial=0``
(parameters per element of [C, D1, ...]) gives Mul+Add with constants of that shape; a
BatchNormalization in training mode, or whose running-statistics outputs are used, is left alone.

Stats: ``bn-folded`` (into a layer), ``bn-to-affine`` (Mul+Add), ``weights-copied``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from compiler.ir import Module, const_value, make_const, unique_name
from compiler.linear import (LINEAR_OPS, channel_constant, channel_vector, layer_problem, out_channels, output_rank,
                             scale_weight, set_input_const, uses)
from compiler.pass_manager import Pass, PassContext, PassKind, PassResult, register
from compiler.patterns import has_single_consumer, producer


@dataclass
class Affine:
    """y = scale * x + shift, parameters in float64 as BatchNormalization stores them ([C] or [C, D1, ...])."""
    scale: np.ndarray
    shift: np.ndarray

    @property
    def per_channel(self) -> bool:
        return self.scale.size == self.scale.shape[0]

    @property
    def channels(self) -> int:
        return self.scale.shape[0]


def bn_affine(bn: gs.Node) -> tuple[Affine | None, str]:
    """The affine map of an inference-mode BatchNormalization, or (None, why it is not one)."""
    if bn.attrs.get("training_mode", 0):
        return None, "training_mode=1 normalises with batch statistics"
    if any(t.outputs for t in bn.outputs[1:]):
        return None, "its running mean/variance outputs are used"
    params = [const_value(t) for t in bn.inputs[1:5]]
    if len(params) < 4 or any(p is None for p in params):
        return None, "scale, bias, mean or variance is not a constant"
    gamma, beta, mean, var = (np.asarray(p, np.float64) for p in params)
    try:
        shape = np.broadcast_shapes(gamma.shape, beta.shape, mean.shape, var.shape)
    except ValueError:
        return None, "parameter shapes do not agree"
    if not shape:
        return None, "parameters are scalars"
    scale = np.broadcast_to(gamma / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5))), shape)
    return Affine(scale, np.broadcast_to(beta, shape) - np.broadcast_to(mean, shape) * scale), ""


def per_channel_shape(channels: int, rank: int) -> tuple:
    """Shape of a constant that broadcasts one value per channel of axis 1 over a rank-``rank`` tensor."""
    return (channels,) + (1,) * (rank - 2)


@dataclass
class FoldSite:
    """A layer that can absorb a BatchNormalization, and the Add holding its bias if paddle2onnx split it off."""
    layer: gs.Node
    bias_add: gs.Node | None = None
    bias_index: int = 1  # which input of bias_add is the constant

    @property
    def last(self) -> gs.Node:
        return self.bias_add or self.layer


def find_site(graph: gs.Graph, bn: gs.Node, channels: int) -> tuple[FoldSite | None, str]:
    x = bn.inputs[0]
    if not has_single_consumer(graph, x):
        return None, f"its input %{x.name} also feeds other nodes or is a graph output"
    node = producer(x)
    if node is None:
        return None, f"its input %{x.name} is a graph input or constant"
    site = FoldSite(node)
    if node.op == "Add" and len(node.inputs) == 2:
        index = next((i for i in (1, 0) if const_value(node.inputs[i]) is not None), None)
        upstream = producer(node.inputs[1 - index]) if index is not None else None
        if upstream is None or upstream.op not in LINEAR_OPS or not has_single_consumer(graph, node.inputs[1 - index]):
            return None, "its producer Add is not a constant bias added to a Conv, ConvTranspose, Gemm or MatMul"
        site = FoldSite(upstream, node, index)
    problem = layer_problem(site.layer)
    if problem:
        return None, problem
    weight = const_value(site.layer.inputs[1])
    if out_channels(site.layer, weight) != channels:
        return None, f"the {site.layer.op} has {out_channels(site.layer, weight)} output channels, the BatchNormalization {channels}"
    if site.bias_add is not None:
        bias = const_value(site.bias_add.inputs[site.bias_index])
        if channel_constant(bias, channels, output_rank(site.layer, weight)) is None:
            return None, f"the Add after the {site.layer.op} is not a per-channel bias (constant shape {list(bias.shape)})"
    return site, ""


def replace_output(bn: gs.Node, node: gs.Node) -> None:
    """Make ``node`` write the BatchNormalization's output tensor (its name, and graph outputs, survive)."""
    y = bn.outputs[0]
    bn.inputs.clear()
    bn.outputs.clear()
    if node.outputs:
        node.outputs[0] = y
    else:
        node.outputs.append(y)


@register
class FoldBatchNorm(Pass):
    name = "fold-bn"
    kind = PassKind.FLOAT_PRESERVING

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        graph = module.graph
        graph.toposort()
        stats = {"bn-folded": 0, "bn-to-affine": 0, "weights-copied": 0}
        # Tensors only join the graph until the cleanup below, so one scan names every new constant.
        self.tensor_names = set(graph.tensors())
        for bn in [n for n in graph.nodes if n.op == "BatchNormalization"]:
            affine, why = bn_affine(bn)
            if affine is None:
                ctx.remark(bn, f"left as is: {why}")
                continue
            site, why = find_site(graph, bn, affine.channels) if affine.per_channel else (None, "its parameters are per element (spatial=0)")
            if site is not None:
                self.fold(graph, bn, site, affine, ctx, stats)
                stats["bn-folded"] += 1
            elif self.to_affine(graph, bn, affine, ctx, why):
                stats["bn-to-affine"] += 1
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(stats["bn-folded"] + stats["bn-to-affine"] > 0, stats)

    def fold(self, graph, bn, site: FoldSite, affine: Affine, ctx, stats) -> None:
        layer, s, t = site.layer, affine.scale.reshape(-1), affine.shift.reshape(-1)
        weight_tensor = layer.inputs[1]
        weight = const_value(weight_tensor)
        if uses(graph, weight_tensor) > 1:
            ctx.remark(layer, f"weight @{weight_tensor.name} is shared with other nodes: folded into a copy")
            stats["weights-copied"] += 1
        set_input_const(graph, layer, 1, scale_weight(layer, weight.astype(np.float64), s).astype(weight.dtype),
                        self.tensor_names)
        dtype = weight.dtype
        # The layer's own bias is scaled too; the shift goes into the following bias Add if there is one.
        shift_in_layer = site.bias_add is None
        if site.bias_add is not None:
            bias = const_value(site.bias_add.inputs[site.bias_index])
            channels = len(s)
            shape = bias.shape if bias.size == channels else per_channel_shape(channels, output_rank(layer, weight))
            folded = channel_vector(bias, channels) * s + t
            set_input_const(graph, site.bias_add, site.bias_index, folded.reshape(shape).astype(bias.dtype), self.tensor_names)
        has_bias = len(layer.inputs) > 2 and layer.inputs[2].name
        if layer.op in ("Conv", "ConvTranspose") and (has_bias or shift_in_layer):
            bias = const_input_or_zero(layer, 2, len(s))
            set_input_const(graph, layer, 2, (bias * s + (t if shift_in_layer else 0.0)).astype(dtype), self.tensor_names)
        elif layer.op == "Gemm":
            beta = float(layer.attrs.get("beta", 1.0))
            if has_bias and beta != 0.0:
                c = np.asarray(const_value(layer.inputs[2]), np.float64)
                set_input_const(graph, layer, 2, (c * s + (t / beta if shift_in_layer else 0.0)).astype(dtype),
                                self.tensor_names)
            elif shift_in_layer:
                layer.attrs["beta"] = 1.0
                set_input_const(graph, layer, 2, t.astype(dtype), self.tensor_names)
        elif layer.op == "MatMul" and shift_in_layer:  # no bias Add to take the shift: give it one
            add = gs.Node("Add", unique_name(graph, f"{bn.name or bn.outputs[0].name}_bias"),
                          inputs=[bn.inputs[0], make_const(graph, f"{bn.outputs[0].name}_bias", t.astype(dtype), self.tensor_names)])
            graph.nodes.append(add)
            replace_output(bn, add)
            return
        replace_output(bn, site.last)

    def to_affine(self, graph, bn, affine: Affine, ctx, why: str) -> bool:
        x, y = bn.inputs[0], bn.outputs[0]
        rank = len(x.shape) if x.shape is not None else (len(y.shape) if y.shape is not None else None)
        if rank is None or rank < 2:
            ctx.remark(bn, f"left as is: not foldable ({why}) and its input rank is unknown (fix the input shapes)")
            return False
        if affine.per_channel:
            shape = per_channel_shape(affine.channels, rank)
        elif affine.scale.ndim == rank - 1:
            shape = affine.scale.shape
        else:
            ctx.remark(bn, f"left as is: parameters of shape {list(affine.scale.shape)} do not match a rank-{rank} input")
            return False
        dtype = np.dtype(x.dtype) if x.dtype is not None else np.dtype(np.float32)
        ctx.remark(bn, f"rewritten as Mul+Add: {why}")
        base = bn.name or y.name
        scale = make_const(graph, f"{base}_scale", affine.scale.reshape(shape).astype(dtype), self.tensor_names)
        shift = make_const(graph, f"{base}_shift", affine.shift.reshape(shape).astype(dtype), self.tensor_names)
        scaled = gs.Variable(unique_name(graph, f"{y.name}_scaled"), dtype=x.dtype, shape=x.shape)
        self.tensor_names.add(scaled.name)
        mul = gs.Node("Mul", unique_name(graph, f"{base}_mul"), inputs=[x, scale], outputs=[scaled])
        add = gs.Node("Add", unique_name(graph, f"{base}_add"), inputs=[scaled, shift])
        graph.nodes.extend([mul, add])
        replace_output(bn, add)
        return True


def const_input_or_zero(node: gs.Node, index: int, channels: int) -> np.ndarray:
    if index < len(node.inputs) and node.inputs[index].name:
        return channel_vector(const_value(node.inputs[index]), channels)
    return np.zeros(channels)
