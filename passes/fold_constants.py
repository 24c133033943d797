"""Turn Constant nodes into initializers and fold constant subgraphs.

Exporters such as paddle2onnx write every weight as a Constant node and compute
reshape targets with Shape/Slice/Concat at run time; later passes match weights
as initializers and need static shapes, so this runs first. Folding evaluates the
constant subgraphs with onnxruntime (onnx-graphsurgeon's fold_constants); Shape of
a tensor whose shape is known is folded too.
"""
from __future__ import annotations

from dataclasses import dataclass

from compiler.ir import Module
from compiler.pass_manager import Pass, PassContext, PassKind, PassResult, register


@register
class FoldConstants(Pass):
    name = "fold-constants"
    kind = PassKind.FLOAT_PRESERVING

    @dataclass(frozen=True)
    class Options:
        fold_shapes: bool = True

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        graph = module.graph
        before = len(graph.nodes)
        constant_nodes = sum(1 for n in graph.nodes if n.op == "Constant")
        graph.fold_constants(fold_shapes=self.options.fold_shapes, error_ok=True, flatten_subgraphs=False)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        removed = before - len(graph.nodes)
        if removed:
            module.infer_shapes()
        return PassResult(removed > 0, {"nodes-folded": removed, "constant-nodes": constant_nodes})
