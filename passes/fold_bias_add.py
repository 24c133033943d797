"""Fold an Add of a per-output-channel constant into the bias of the Conv, ConvTranspose or Gemm before it.

paddle2onnx writes a layer's bias as a separate node, and fold-bn leaves it there when a
BatchNormalization follows (it folds the normalisation into that constant):

    %c = ConvTranspose(%x, @w)                %y = ConvTranspose(%x, @w, @b')     b' = b + c
    %y = Add(%c, @c)                    ->

Why: quantized, the separate Add costs a requantization of the layer's output before the bias is
added, and QNN's HTP backend computes ConvTranspose followed by such an Add wrong (it leaves the
constant out: docs/htp-backend.md); as the layer's own int32 bias input the same values are right.

Matches a layer whose output feeds only an ``Add`` with a constant that holds one value, or one
value per output channel on the channel axis (axis 1 of NCHW; the last axis of a Gemm), all other
axes 1 and no more axes than the output has. Gemm needs ``beta = 1`` and a bias of one value per
column (or none). Anything else is left as it is, with a remark when only the constant's shape or
the Gemm's form stood in the way.

Stats: ``adds-folded``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from compiler.ir import Module, const_value
from compiler.linear import set_input_const
from compiler.pass_manager import Pass, PassContext, PassKind, PassResult, register
from compiler.patterns import has_single_consumer

LAYERS = ("Conv", "ConvTranspose", "Gemm")


def out_channels(node: gs.Node, weight: np.ndarray) -> int:
    if node.op == "ConvTranspose":
        return weight.shape[1] * int(node.attrs.get("group", 1))
    if node.op == "Gemm":
        return weight.shape[0] if node.attrs.get("transB", 0) else weight.shape[1]
    return weight.shape[0]


def channel_values(constant: np.ndarray, channels: int, out_rank: int, channel_axis: int) -> np.ndarray | None:
    """The constant as one value per channel, or None if it varies along another axis or adds axes."""
    if constant.size == 1 and constant.ndim <= out_rank:
        return np.full(channels, constant.reshape(-1)[0], dtype=np.float64)
    shape = list(constant.shape)
    if len(shape) > out_rank:
        return None
    position = len(shape) - (out_rank - channel_axis)  # the channel axis, counted in the constant's own axes
    if position < 0 or shape[position] != channels or any(d != 1 for i, d in enumerate(shape) if i != position):
        return None
    return constant.reshape(-1).astype(np.float64)


@register
class FoldBiasAdd(Pass):
    name = "fold-bias-add"
    kind = PassKind.FLOAT_PRESERVING

    @dataclass(frozen=True)
    class Options:
        pass

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        graph = module.graph
        folded = 0
        for node in list(graph.nodes):
            if node.op not in LAYERS or len(node.inputs) < 2 or not has_single_consumer(graph, node.outputs[0]):
                continue
            add = node.outputs[0].outputs[0]
            if add.op != "Add" or len(add.inputs) != 2 or add.inputs[0] is add.inputs[1]:
                continue
            index = 1 if add.inputs[0] is node.outputs[0] else 0
            constant = const_value(add.inputs[index])
            weight = const_value(node.inputs[1])
            if constant is None or weight is None:
                continue
            if self._fold(graph, node, add, constant, weight, ctx):
                folded += 1
        if folded:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(folded > 0, {"adds-folded": folded})

    def _fold(self, graph: gs.Graph, node: gs.Node, add: gs.Node, constant: np.ndarray, weight: np.ndarray,
              ctx: PassContext) -> bool:
        channels = out_channels(node, weight)
        out_rank, channel_axis = (2, 1) if node.op == "Gemm" else (weight.ndim, 1)
        values = channel_values(constant, channels, out_rank, channel_axis)
        if values is None:
            ctx.remark(add, f"not folded into {node.name or node.op}: constant of shape {list(constant.shape)} "
                            f"is not one value per output channel ({channels})")
            return False
        if node.op == "Gemm" and (float(node.attrs.get("beta", 1.0)) != 1.0 or not self._gemm_bias_is_per_column(node, channels)):
            ctx.remark(add, f"not folded into Gemm {node.name}: beta != 1 or its C is not one value per column")
            return False
        bias = const_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
        if len(node.inputs) > 2 and node.inputs[2].name and bias is None:
            return False  # a computed bias: nothing to fold into
        base = np.zeros(channels) if bias is None else np.broadcast_to(bias.reshape(-1).astype(np.float64), (channels,))
        dtype = weight.dtype
        set_input_const(graph, node, 2, (base + values).astype(dtype))
        result = add.outputs[0]
        add.outputs.clear()
        add.inputs.clear()
        node.outputs[0] = result
        return True

    @staticmethod
    def _gemm_bias_is_per_column(node: gs.Node, channels: int) -> bool:
        if len(node.inputs) < 3 or not node.inputs[2].name:
            return True
        bias = const_value(node.inputs[2])
        return bias is not None and bias.size in (1, channels) and (bias.ndim < 2 or bias.shape[0] == 1)
