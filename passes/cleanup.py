"""Remove dead nodes and pass-through ops (Identity, inference-mode Dropout, no-op Cast); rename nodes that
share a name (ONNX allows it, onnxruntime refuses such a model).

Pass-through nodes cost a requantization boundary on HTP and hide patterns from
later passes (Conv -> Identity -> BatchNormalization does not match fold-bn).
Graph inputs and outputs keep their names.
"""
from __future__ import annotations


import numpy as np

from compiler.ir import Module, unique_name
from compiler.pass_manager import Pass, PassContext, PassKind, PassResult, register
from compiler.patterns import bypass


def _is_pass_through(node) -> bool:
    if node.op == "Identity":
        return True
    if node.op == "Dropout":
        # Inference Dropout is identity unless its mask output is used.
        return len(node.outputs) < 2 or not node.outputs[1].outputs
    if node.op == "Cast":
        src = node.inputs[0].dtype
        return src is not None and np.dtype(src) == np.dtype(_cast_target(node))
    return False


def _cast_target(node):
    from onnx import helper
    return helper.tensor_dtype_to_np_dtype(node.attrs["to"])


@register
class Cleanup(Pass):
    name = "cleanup"
    kind = PassKind.FLOAT_PRESERVING

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        graph = module.graph
        bypassed = 0
        for node in list(graph.nodes):
            if node.outputs and _is_pass_through(node):
                if bypass(graph, node):
                    bypassed += 1
                else:
                    ctx.remark(node, "kept: it connects a graph input or constant straight to a graph output")
        before = len(graph.nodes)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        dead = before - len(graph.nodes) - bypassed
        renamed = _rename_duplicates(graph)
        return PassResult(bypassed + dead + renamed > 0, {"pass-through-removed": bypassed, "dead-removed": max(dead, 0),
                                                          "duplicate-names-renamed": renamed})


def _rename_duplicates(graph) -> int:
    """Give every named node after the first of its name a fresh name; unnamed nodes stay unnamed."""
    taken = set(graph.tensors()) | {n.name for n in graph.nodes}
    seen, renamed = set(), 0
    for node in graph.nodes:
        if node.name and node.name in seen:
            node.name = unique_name(graph, node.name, taken)
            renamed += 1
        seen.add(node.name)
    return renamed
