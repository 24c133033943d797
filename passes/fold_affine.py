"""Fold per-channel constant Mul and Add nodes (and Sub, Div by a constant) into the linear layers next to them.

Each such node is one more tensor to quantize (and requantize) on HTP. paddle2onnx writes them
often: a layer's bias as a separate Add (fold-bn leaves it when a BatchNormalization follows), and
PP-LCNetV3's learnable affine blocks, ``y = a * x + b`` with scalars a, b, after every convolution
and after every activation (PP-OCR det has 28 + 26). Folded, they cost nothing.

Into the producer (Conv, ConvTranspose, Gemm, MatMul whose output feeds only the node):

    %c = Conv(%x, @w, @b)                      %y = Conv(%x, @w', @b')
    %m = Mul(%c, @k)               ->          w'[o] = k[o] w[o]    b' = k b + t
    %y = Add(%m, @t)

Into the consumers (every reader of the node's output is a Conv, Gemm or MatMul, reading it as
its data input):

    %m = Mul(%h, @k)                           %y = Conv(%h, @w', @b')
    %a = Add(%m, @t)               ->          w'[:, c] = k[c] w[:, c]
    %y = Conv(%a, @w, @b)                      b'[o] = b[o] + sum_{c, taps} w[o, c, taps] t[c]

A constant qualifies if it holds one value, or one value per channel on the channel axis (axis 1
of NCHW; a Gemm's or MatMul's last axis). An Add folds into a consumer only where the consumer has
a bias input (not MatMul) and no zero padding: a padded border would see t where the original saw
0 (the remark says so). ConvTranspose, whose ``ConvTranspose + Add(constant)`` HTP computes wrong
(docs/htp-backend.md), takes such an Add into its own bias this way.

A Gemm's ``alpha`` and ``beta`` fold into its constant B and C the same way (QNN's HTP refuses a
Gemm with alpha != 1).

Stats: ``into-producer``, ``into-consumers`` (nodes folded), ``gemm-scales`` (alpha/beta folded).
"""
from __future__ import annotations


import numpy as np
import onnx_graphsurgeon as gs

from compiler.ir import Module, const_value
from compiler.linear import LINEAR_OPS, LinearLayer, channel_constant, linear_layer, set_input_const
from compiler.pass_manager import Pass, PassContext, PassKind, PassResult, register
from compiler.patterns import constant_operand, has_single_consumer, is_graph_output, producer
from compiler.linear import channel_vector, layer_problem, out_channels, output_rank, scale_weight


def layer_bias(node: gs.Node, channels: int) -> np.ndarray | None:
    """The layer's bias as one value per output channel (zeros if it has none); None if it cannot take one."""
    if node.op == "MatMul":
        return None
    if node.op == "Gemm" and float(node.attrs.get("beta", 1.0)) != 1.0:
        return None
    if len(node.inputs) < 3 or not node.inputs[2].name:
        return np.zeros(channels)
    bias = const_value(node.inputs[2])
    if bias is None or bias.size not in (1, channels) or (bias.ndim == 2 and bias.shape[0] != 1):
        return None
    return channel_vector(bias, channels)


def take_output(node: gs.Node, layer: gs.Node) -> None:
    """Make ``layer`` write ``node``'s output tensor (its name, and graph outputs, survive) and drop ``node``."""
    result = node.outputs[0]
    node.inputs.clear()
    node.outputs.clear()
    layer.outputs[0] = result


@register
class FoldAffine(Pass):
    name = "fold-affine"
    kind = PassKind.FLOAT_PRESERVING

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        graph = module.graph
        stats = {"into-producer": 0, "into-consumers": 0, "gemm-scales": self.fold_gemm_scales(graph)}
        declined: dict[str, tuple[gs.Node, str]] = {}  # node name -> (node, why it stays)
        changed = True
        while changed:
            changed = False
            for node in list(graph.nodes):
                if not node.outputs:
                    continue
                operand = constant_operand(node)
                if operand is None:
                    continue
                if self.into_producer(graph, node, *operand):
                    stats["into-producer"] += 1
                    changed = True
                elif self.into_consumers(graph, node, *operand, declined):
                    stats["into-consumers"] += 1
                    changed = True
        for node, why in (declined[name] for name in sorted(declined)):
            ctx.remark(node, why)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(any(stats.values()), stats)

    def into_producer(self, graph: gs.Graph, node: gs.Node, x, value: np.ndarray, kind: str) -> bool:
        layer = producer(x)
        if layer is None or layer.op not in LINEAR_OPS or layer_problem(layer) or not has_single_consumer(graph, x):
            return False
        weight = const_value(layer.inputs[1])
        channels = out_channels(layer, weight)
        rank = output_rank(layer, weight)  # channels on axis 1: NCHW, or a Gemm's / rank-2 MatMul's columns
        k = channel_constant(value, channels, rank, 1)
        if k is None:
            return False
        has_bias = len(layer.inputs) > 2 and layer.inputs[2].name
        if kind == "Mul":
            set_input_const(graph, layer, 1, scale_weight(layer, weight.astype(np.float64), k).astype(weight.dtype))
            if has_bias:  # y = xW + beta C: k y = x (kW) + beta (kC); k runs along C's last axis (a Conv's only one)
                bias = const_value(layer.inputs[2]).astype(np.float64)
                set_input_const(graph, layer, 2, (bias * k).astype(weight.dtype))
        else:
            bias = layer_bias(layer, channels)
            if bias is None:
                return False
            set_input_const(graph, layer, 2, (bias + k).astype(weight.dtype))
        take_output(node, layer)
        return True

    def into_consumers(self, graph: gs.Graph, node: gs.Node, x, value: np.ndarray, kind: str, declined: dict) -> bool:
        out = node.outputs[0]
        readers = list(out.outputs)
        if not readers or is_graph_output(graph, out):
            return False
        layers = []
        for reader in readers:
            layer, _ = linear_layer(reader)
            if layer is None or reader.inputs[0] is not out or any(t is out for t in reader.inputs[1:]):
                return False
            layers.append(layer)
        per_channel = []
        for layer in layers:
            rank = 4 if layer.is_conv else len(out.shape) if out.shape is not None else 2
            k = channel_constant(value, layer.in_channels, rank, 1 if layer.is_conv else rank - 1)
            if k is None:
                return False
            if kind == "Add":
                if layer_bias(layer.node, layer.out_channels) is None:
                    return False
                if layer.has_padding():
                    declined[node.name] = (node, f"not folded into {layer.node.name or layer.node.op}: it pads with "
                                                 "zeros, and a padded border would see the added constant")
                    return False
            per_channel.append(k)
        for layer, k in zip(layers, per_channel):
            self.fold_input(graph, layer, kind, k)
            layer.node.inputs[0] = x
        declined.pop(node.name, None)
        node.inputs.clear()
        node.outputs.clear()
        return True

    @staticmethod
    def fold_gemm_scales(graph: gs.Graph) -> int:
        """Gemm's alpha into its constant B, beta into its constant C (QNN's HTP refuses alpha != 1)."""
        folded = 0
        for node in graph.nodes:
            if node.op != "Gemm" or len(node.inputs) < 2:
                continue
            for attr, index in (("alpha", 1), ("beta", 2)):
                factor = float(node.attrs.get(attr, 1.0))
                value = const_value(node.inputs[index]) if index < len(node.inputs) and node.inputs[index].name else None
                if factor != 1.0 and value is not None and np.issubdtype(value.dtype, np.floating):
                    set_input_const(graph, node, index, (value.astype(np.float64) * factor).astype(value.dtype))
                    node.attrs[attr] = 1.0
                    folded += 1
        return folded

    @staticmethod
    def fold_input(graph: gs.Graph, layer: LinearLayer, op: str, k: np.ndarray) -> None:
        weight = layer.weight
        view = layer.input_channel_view(weight.astype(np.float64))  # [g, O/g, C/g, taps]
        per_group = k.reshape(layer.groups, 1, -1, 1)
        if op == "Mul":
            scaled = (view * per_group).reshape(view.shape[0], view.shape[1], -1)
            set_input_const(graph, layer.node, 1, layer.from_matrix(scaled))
            return
        shift = (view * per_group).sum(axis=(2, 3)).reshape(-1)
        bias = layer_bias(layer.node, layer.out_channels)
        set_input_const(graph, layer.node, 2, (bias + shift).astype(weight.dtype))
