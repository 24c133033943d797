"""A small matcher for op chains, and graph queries passes share.

``match_chain(graph, [Op("Conv"), Op("BatchNormalization")])`` yields every run of
nodes where each node's first output feeds the next node and (by default) nothing
else: the single-consumer condition that makes fusing the run safe.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import networkx as nx
import numpy as np
import onnx_graphsurgeon as gs

from compiler.ir import const_value


@dataclass(frozen=True)
class Op:
    """One step of a chain: op type(s), an optional predicate, and which input the previous node feeds."""
    types: str | tuple
    where: Callable[[gs.Node], bool] | None = None
    input_index: int | None = None  # None: any input

    def matches(self, node: gs.Node) -> bool:
        types = (self.types,) if isinstance(self.types, str) else self.types
        return node.op in types and (self.where is None or self.where(node))


def producer(tensor) -> gs.Node | None:
    return tensor.inputs[0] if tensor.inputs else None


def consumers(tensor) -> list[gs.Node]:
    return list(tensor.outputs)


def is_graph_output(graph: gs.Graph, tensor) -> bool:
    return any(out is tensor for out in graph.outputs)


def has_single_consumer(graph: gs.Graph, tensor) -> bool:
    return len(tensor.outputs) == 1 and not is_graph_output(graph, tensor)


class Decline(Exception):
    """Why a candidate is not the pattern a pass matches: the pass turns it into a remark."""


def single_user(graph: gs.Graph, tensor, role: str) -> gs.Node:
    """The one node reading ``tensor`` (an intermediate of a pattern, named ``role`` in the message); Decline
    when others read it too or it is a graph output."""
    if not has_single_consumer(graph, tensor):
        raise Decline(f"{role} %{tensor.name} feeds other nodes or is a graph output")
    return tensor.outputs[0]


def const_input(node: gs.Node, index: int) -> np.ndarray | None:
    if index >= len(node.inputs) or not node.inputs[index].name:
        return None
    return const_value(node.inputs[index])


def constant_operand(node: gs.Node) -> tuple[gs.Tensor, np.ndarray, str] | None:
    """(variable input, constant, "Mul" or "Add") of a two-input node that scales or shifts by one constant
    input: Mul, Add, and ``x - c`` (Add of -c) and ``x / c`` (Mul by 1/c, c without zeros), as input
    normalisations are written."""
    if node.op not in ("Mul", "Add", "Sub", "Div") or len(node.inputs) != 2:
        return None
    values = [const_value(t) for t in node.inputs]
    if (values[0] is None) == (values[1] is None):
        return None
    index = 0 if values[0] is not None else 1
    value = values[index]
    if not np.issubdtype(value.dtype, np.floating):
        return None
    if node.op in ("Sub", "Div") and index == 0:
        return None  # c - x, c / x
    if node.op == "Sub":
        return node.inputs[0], -value.astype(np.float64), "Add"
    if node.op == "Div":
        return (node.inputs[0], 1.0 / value.astype(np.float64), "Mul") if np.all(value != 0) else None
    return node.inputs[1 - index], value, node.op


def is_const(tensor) -> bool:
    return const_value(tensor) is not None


def match_chain(graph: gs.Graph, chain: list, *, single_consumer: bool = True) -> Iterator[list[gs.Node]]:
    """Yield node lists matching ``chain`` (a list of Op or op-type strings), in graph order.

    Matches are computed up front, so a pass may rewrite each match as it iterates
    provided a rewrite does not touch nodes of another match.
    """
    steps = [step if isinstance(step, Op) else Op(step) for step in chain]
    matches = []
    for node in list(graph.nodes):
        if not steps[0].matches(node):
            continue
        run = [node]
        for step in steps[1:]:
            tensor = run[-1].outputs[0]
            users = tensor.outputs
            if single_consumer and not has_single_consumer(graph, tensor):
                break
            nxt = next((u for u in users if step.matches(u)), None)
            if nxt is None or (step.input_index is not None and
                               (len(nxt.inputs) <= step.input_index or nxt.inputs[step.input_index] is not tensor)):
                break
            run.append(nxt)
        if len(run) == len(steps):
            matches.append(run)
    yield from matches


def to_networkx(graph: gs.Graph) -> nx.DiGraph:
    """Node-level dataflow graph: vertices are node indices in ``graph.nodes``, edges carry the tensor."""
    dag = nx.DiGraph()
    index = {id(node): i for i, node in enumerate(graph.nodes)}
    for i, node in enumerate(graph.nodes):
        dag.add_node(i, node=node)
        for tensor in node.outputs:
            for user in tensor.outputs:
                if id(user) in index:
                    dag.add_edge(i, index[id(user)], tensor=tensor.name)
    return dag


def replace_tensor_uses(graph: gs.Graph, old, new) -> None:
    """Point every consumer (and graph output) of ``old`` at ``new``."""
    for user in list(old.outputs):
        for i, tensor in enumerate(user.inputs):
            if tensor is old:
                user.inputs[i] = new
    graph.outputs = [new if t is old else t for t in graph.outputs]


def bypass(graph: gs.Graph, node: gs.Node) -> bool:
    """Remove a single-input pass-through node, wiring its consumers to its input.

    Graph outputs keep their names: when the node's output is one, the producer of
    the input is made to write it instead. Returns False (node kept) where that is
    impossible: the input is a graph input, a constant or another graph output.
    """
    src, dst = node.inputs[0], node.outputs[0]
    if is_graph_output(graph, dst):
        src_producer = producer(src)
        if src_producer is None or is_graph_output(graph, src) or any(t is src for t in graph.inputs):
            return False
        replace_tensor_uses(graph, src, dst)
        node.outputs.clear()
        node.inputs.clear()
        src_producer.outputs[src_producer.outputs.index(src)] = dst
        return True
    replace_tensor_uses(graph, dst, src)
    node.inputs.clear()
    node.outputs.clear()
    return True


def close(value: float, target: float) -> bool:
    return math.isclose(value, target, rel_tol=1e-5, abs_tol=1e-6)


def scalar(tensor, like) -> float | None:
    """A one-element float constant that broadcasting against ``like`` cannot give a higher rank."""
    value = const_value(tensor)
    if value is None or value.size != 1 or not np.issubdtype(value.dtype, np.floating):
        return None
    rank = len(like.shape) if like.shape is not None else 1
    return float(value.reshape(-1)[0]) if value.ndim <= rank else None


def variable_and_scalar(node: gs.Node) -> tuple:
    """(variable input, its index, scalar constant of the other input) of a binary node, else (None, ...)."""
    if len(node.inputs) != 2:
        return None, None, None
    for index in (0, 1):
        var, other = node.inputs[index], node.inputs[1 - index]
        if const_value(var) is None:
            c = scalar(other, var)
            if c is not None:
                return var, index, c
    return None, None, None


def affine_of(node: gs.Node) -> tuple | None:
    """(v, p, q) with node output = p v + q for a scalar Add/Sub/Mul/Div of a variable v."""
    var, index, c = variable_and_scalar(node)
    if var is None:
        return None
    if node.op == "Add":
        return var, 1.0, c
    if node.op == "Sub":
        return (var, 1.0, -c) if index == 0 else (var, -1.0, c)
    if node.op == "Mul":
        return var, c, 0.0
    if node.op == "Div" and index == 0 and c != 0.0:
        return var, 1.0 / c, 0.0
    return None
