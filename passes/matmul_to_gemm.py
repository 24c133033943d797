"""Rewrite a MatMul by a constant weight plus a constant bias Add as one Gemm (a linear layer with a bias).

    %m = MatMul(%x, @w)          x: [N, K], w: [K, M]                 %y = Gemm(%x, @w, @b)
    %y = Add(%m, @b)             b: [M] or [1, M] (or b + m)     ->

and over a sequence (a transformer's projection), x: [d0, ..., K] of rank 3 or more, between two Reshapes, as
qnn-onnx-converter lowers it to a FullyConnected:

    %r = Reshape(%x, [-1, K]);  %g = Gemm(%r, @w, @b);  %y = Reshape(%g, [d0, ..., M])

(at most one leading dimension may be unknown: it becomes the -1 of the second Reshape). y = x w + b either
way, so the float outputs do not change. Why: QNN's converter, its HTP backend and AIMET
all see MatMul + Add as one FullyConnected op, so the tensor between them does not exist for them (an
encodings file naming it is refused) and the bias is theirs to quantize. As a Gemm, insert-qdq quantizes the
weight per output channel and the bias as int32 with scale s_in * s_w, as for every Conv, and the encodings
describe what those tools run.

Declined with a remark: an input of unknown rank, of rank 1, or with two unknown leading dimensions (pin
the input shape: no static Reshape restores it), a bias that is not one value per output column, a MatMul
output read by anything else. A MatMul
with no bias Add is left as it is.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from compiler.ir import Module, const_value, make_const, unique_name
from compiler.pass_manager import Pass, PassContext, PassKind, PassResult, register
from compiler.patterns import constant_operand, has_single_consumer


def _bias_add(graph: gs.Graph, matmul: gs.Node) -> gs.Node | None:
    """The Add that adds a constant to ``matmul``'s output, if that is its only reader."""
    product = matmul.outputs[0]
    if not has_single_consumer(graph, product):
        return None
    reader = product.outputs[0]
    operand = constant_operand(reader)
    return reader if reader.op == "Add" and operand is not None and operand[0] is product else None


def _why_not(matmul: gs.Node, weight: np.ndarray, bias: np.ndarray) -> str:
    """Why this MatMul + Add cannot be one Gemm ('' if it can)."""
    shape = matmul.inputs[0].shape
    if shape is None or len(shape) < 2:
        return f"input rank {len(shape) if shape is not None else 'unknown'}: Gemm takes 2-D inputs"
    if len(shape) > 2 and sum(not isinstance(d, int) or d < 0 for d in shape[:-1]) > 1:
        return f"input shape {list(shape)} has more than one unknown leading dimension (pin the input shape)"
    if bias.size != weight.shape[1] or bias.ndim > 2 or (bias.ndim == 2 and bias.shape[0] != 1):
        return f"bias of shape {list(bias.shape)} is not one value per output column ({weight.shape[1]})"
    if bias.dtype != weight.dtype:
        return f"bias is {bias.dtype}, the weight {weight.dtype}"
    return ""


def _as_rows(graph: gs.Graph, matmul: gs.Node, x: gs.Variable, y: gs.Variable, columns: int) -> tuple:
    """(x as [-1, K] rows through a Reshape, the Gemm's [rows, M] output, which a Reshape back to x's leading
    dimensions and M turns into ``y``)."""
    leading = [d if isinstance(d, int) and d >= 0 else -1 for d in x.shape[:-1]]
    known = None if -1 in leading else int(np.prod(leading))
    names = set(graph.tensors()) | {n.name for n in graph.nodes}
    flat = gs.Variable(unique_name(graph, f"{x.name}_rows", names), dtype=x.dtype, shape=[known, x.shape[-1]])
    graph.nodes.append(gs.Node("Reshape", name=unique_name(graph, f"{matmul.name or y.name}_to_rows", names), inputs=[
        x, make_const(graph, f"{flat.name}_shape", np.array([-1, x.shape[-1]], dtype=np.int64), names)], outputs=[flat]))
    product = gs.Variable(unique_name(graph, f"{y.name}_rows", names), dtype=y.dtype, shape=[known, columns])
    graph.nodes.append(gs.Node("Reshape", name=unique_name(graph, f"{matmul.name or y.name}_from_rows", names), inputs=[
        product, make_const(graph, f"{y.name}_shape", np.array(leading + [columns], dtype=np.int64), names)], outputs=[y]))
    return flat, product


@register
class MatMulToGemm(Pass):
    name = "matmul-to-gemm"
    kind = PassKind.FLOAT_PRESERVING

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        graph = module.graph
        rewritten = declined = 0
        for matmul in [n for n in graph.nodes if n.op == "MatMul"]:
            weight = const_value(matmul.inputs[1])
            if weight is None or weight.ndim != 2 or not np.issubdtype(weight.dtype, np.floating):
                continue
            add = _bias_add(graph, matmul)
            if add is None:
                continue
            bias = constant_operand(add)[1]
            why = _why_not(matmul, weight, bias)
            if why:
                ctx.remark(matmul, f"not rewritten as Gemm: {why}")
                declined += 1
                continue
            bias_input = next(t for t in add.inputs if t is not matmul.outputs[0])
            if bias.ndim != 1:
                bias_input = make_const(graph, f"{bias_input.name}_row", bias.reshape(-1))
            rows, output = matmul.inputs[0], add.outputs[0]
            if len(rows.shape) > 2:
                rows, output = _as_rows(graph, matmul, rows, output, weight.shape[1])
            gemm = gs.Node("Gemm", name=matmul.name, inputs=[rows, matmul.inputs[1], bias_input], outputs=[output])
            matmul.outputs.clear()
            add.outputs.clear()
            graph.nodes.append(gemm)
            rewritten += 1
        if rewritten:
            graph.cleanup().toposort()
        return PassResult(bool(rewritten), {"rewritten": rewritten, "declined": declined})
