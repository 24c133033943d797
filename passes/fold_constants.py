"""Turn Constant nodes into initializers and fold constant subgraphs.

Exporters such as paddle2onnx write every weight as a Constant node and compute
reshape targets with Shape/Slice/Concat at run time; later passes match weights
as initializers and need static shapes, so this runs first. Folding evaluates the
constant subgraphs with onnxruntime (onnx-graphsurgeon's fold_constants); Shape of
a tensor whose shape is known is folded too. A Constant's scalar or list attribute
(value_float, value_ints, ...) becomes a tensor of ONNX's type for it (float32, int64)
first: onnx-graphsurgeon would fold it to numpy's float64 beside the float32 it meets.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

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
        for node in graph.nodes:
            if node.op == "Constant":
                _as_value_tensor(node)
        graph.fold_constants(fold_shapes=self.options.fold_shapes, error_ok=True, flatten_subgraphs=False)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        removed = before - len(graph.nodes)
        if removed:
            module.infer_shapes()
        return PassResult(removed > 0, {"nodes-folded": removed, "constant-nodes": constant_nodes})


LIST_VALUE_TYPES = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64, "value_ints": np.int64}


def _as_value_tensor(node) -> None:
    for key, dtype in LIST_VALUE_TYPES.items():
        if key in node.attrs:
            node.attrs = {"value": gs.Constant(node.outputs[0].name, np.array(node.attrs[key], dtype=dtype))}
            return
