"""Fuse LayerNorm written with elementwise ops into one LayerNormalization (opset 17).

    LayerNorm(x) = (x - E[x]) / sqrt(Var[x] + eps) * gamma + beta,   E and Var over the last k axes

paddle2onnx, PyTorch (before opset 17) and TensorFlow export it as

    %m = ReduceMean(%x) {axes=[-1]}
    %d = Sub(%x, %m)
    %p = Pow(%d, 2)                    or Mul(%d, %d)
    %v = ReduceMean(%p) {axes=[-1]}
    %a = Add(%v, eps)                  either operand order
    %s = Sqrt(%a)
    %n = Div(%d, %s)                   or Mul(%d, Reciprocal(%s))
    %y = Mul(%n, @gamma)               optional (gamma = 1), either operand order
    %z = Add(%y, @beta)       ->       optional (beta = 0), either operand order
                                       %z = LayerNormalization(%x, @gamma, @beta) {axis=-k, epsilon=eps}

QNN's HTP backend (and AIMET, and qnn-onnx-converter) run LayerNorm as one op, so the intermediate tensors
(%d, %p, %v, %a, %s, %n) are never quantized there; quantizing them, as the decomposed graph asks, costs
accuracy and leaves encodings for tensors those tools do not know. Both ReduceMeans must reduce the same
trailing axes with keepdims; gamma and beta must be constants that vary only along those axes (they are
broadcast to the normalised shape, which LayerNormalization requires). The intermediate tensors must feed
nothing else; the output keeps its name. The anchor is each ReduceMean subtracted from its own input
(``Sub(x, ReduceMean(x))``); one that is not such a LayerNorm gets a remark saying why. Below opset 17 the
matches are left alone with one remark (run upgrade-opset{version=17} first).

Stats: ``layernorm-fused``.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from compiler.ir import Module, const_value, unique_name
from compiler.pass_manager import Pass, PassContext, PassKind, PassResult, register
from compiler.patterns import Decline, has_single_consumer, is_graph_output, scalar, single_user, variable_and_scalar

LAYERNORM_OPSET = 17  # LayerNormalization is an ONNX op from here


def reduced_axes(node: gs.Node, opset: int) -> list | None:
    """The axes a ReduceMean reduces (attribute before opset 18, constant input from 18); None if unknown."""
    if opset >= 18:
        value = const_value(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1].name else None
        return None if value is None else [int(a) for a in value.reshape(-1)]
    axes = node.attrs.get("axes")
    return None if axes is None else [int(a) for a in axes]


def trailing_count(node: gs.Node, opset: int, rank: int | None) -> int:
    """k when ``node`` is a keepdims ReduceMean over the last k axes; Decline otherwise."""
    if node.attrs.get("keepdims", 1) == 0:
        raise Decline(f"{node.name or node.op} drops the reduced axes (keepdims=0)")
    axes = reduced_axes(node, opset)
    if not axes:
        raise Decline(f"{node.name or node.op} reduces every axis or axes that are not constant")
    if any(a >= 0 for a in axes) and rank is None:
        raise Decline(f"{node.name or node.op} reduces positive axes of an input of unknown rank")
    negative = sorted(a - rank if a >= 0 else a for a in axes)
    k = len(negative)
    if negative != list(range(-k, 0)):
        raise Decline(f"{node.name or node.op} reduces axes {axes}, not the last ones")
    return k


def other_input(node: gs.Node, tensor):
    """The input of a two-input ``node`` that is not ``tensor`` (either order); None if it is not an input."""
    if len(node.inputs) != 2 or not any(t is tensor for t in node.inputs):
        return None
    return node.inputs[1] if node.inputs[0] is tensor else node.inputs[0]


def affine_constant(value: np.ndarray | None, x, k: int) -> np.ndarray | None:
    """``value`` broadcast to the normalised shape x.shape[-k:], if it varies only along those axes."""
    normalised = list(x.shape[len(x.shape) - k:])
    if value is None or not np.issubdtype(value.dtype, np.floating) or value.ndim > len(x.shape):
        return None
    leading = value.shape[:max(value.ndim - k, 0)]
    if any(d != 1 for d in leading):
        return None
    trailing = value.reshape(value.shape[len(leading):])
    try:
        return np.broadcast_to(trailing, normalised).astype(x.dtype or value.dtype)
    except ValueError:
        return None


class LayerNormMatch:
    """The nodes of one decomposed LayerNorm around the mean ``mean``, read from the graph (Decline if not one)."""

    def __init__(self, graph: gs.Graph, mean: gs.Node, sub: gs.Node, opset: int):
        self.x = x = mean.inputs[0]
        rank = len(x.shape) if x.shape is not None else None
        self.k = trailing_count(mean, opset, rank)
        if rank is None or any(not isinstance(d, (int, np.integer)) for d in x.shape[rank - self.k:]):
            raise Decline(f"the sizes of the normalised axes of %{x.name} are unknown")
        single_user(graph, mean.outputs[0], "the mean")
        self.d = d = sub.outputs[0]
        if is_graph_output(graph, d):
            raise Decline(f"x - mean %{d.name} is a graph output")
        users = list({id(n): n for n in d.outputs}.values())
        square = next((n for n in users if self._squares(n)), None)
        if square is None:
            raise Decline("x - mean is not squared (Pow(d, 2) or Mul(d, d))")
        variance = single_user(graph, square.outputs[0], "the square")
        if variance.op != "ReduceMean" or trailing_count(variance, opset, rank) != self.k:
            raise Decline(f"the square feeds a {variance.op}, not a ReduceMean over the mean's axes")
        add = single_user(graph, variance.outputs[0], "the variance")
        var, _, eps = variable_and_scalar(add) if add.op == "Add" else (None, None, None)
        if var is not variance.outputs[0] or eps < 0:
            raise Decline(f"the variance feeds a {add.op}, not an Add of a non-negative scalar epsilon")
        self.eps = eps
        sqrt = single_user(graph, add.outputs[0], "variance + eps")
        if sqrt.op != "Sqrt":
            raise Decline(f"variance + eps feeds a {sqrt.op}, not a Sqrt")
        divide, reciprocal = self._divide(graph, sqrt.outputs[0], users, square)
        self.nodes = [mean, sub, square, variance, add, sqrt] + ([reciprocal] if reciprocal else []) + [divide]
        self.out = divide.outputs[0]
        self.gamma = self.beta = None  # (the constant input, its value broadcast to the normalised shape)
        self._affine(graph)

    def _squares(self, node: gs.Node) -> bool:
        d = self.d
        if node.op == "Mul":
            return len(node.inputs) == 2 and node.inputs[0] is d and node.inputs[1] is d
        return node.op == "Pow" and node.inputs[0] is d and scalar(node.inputs[1], d) == 2.0

    def _divide(self, graph: gs.Graph, s, users: list, square: gs.Node) -> tuple:
        """(the node computing d / s, the Reciprocal before it or None); d must feed only it and the square."""
        divider = single_user(graph, s, "the standard deviation")
        reciprocal = None
        if divider.op == "Reciprocal":
            reciprocal, divider = divider, single_user(graph, divider.outputs[0], "1 / std")
            divides = divider.op == "Mul" and other_input(divider, reciprocal.outputs[0]) is self.d
        else:
            divides = divider.op == "Div" and divider.inputs[0] is self.d and divider.inputs[1] is s
        if not divides:
            raise Decline(f"the standard deviation feeds a {divider.op} that does not divide x - mean by it")
        if any(n is not square and n is not divider for n in users):
            raise Decline(f"x - mean %{self.d.name} feeds other nodes")
        return divider, reciprocal

    def _affine(self, graph: gs.Graph) -> None:
        """Take in the Mul by gamma and the Add of beta that follow, where they are constants of the right shape."""
        for op, attr in (("Mul", "gamma"), ("Add", "beta")):
            if not has_single_consumer(graph, self.out):
                return
            user = self.out.outputs[0]
            given = other_input(user, self.out) if user.op == op else None
            value = affine_constant(const_value(given), self.x, self.k) if given is not None else None
            if value is None:
                continue
            setattr(self, attr, (given, value))
            self.nodes.append(user)
            self.out = user.outputs[0]

    def parameter(self, graph: gs.Graph, given: tuple | None, fill: float, hint: str):
        """gamma or beta as LayerNormalization takes it: the given constant where its shape already fits, else a
        new constant (broadcast, or ``fill`` where the export has none)."""
        if given is None:
            shape = list(self.x.shape[len(self.x.shape) - self.k:])
            return gs.Constant(unique_name(graph, hint), np.full(shape, fill, dtype=self.x.dtype or np.float32))
        tensor, value = given
        if const_value(tensor).shape == value.shape and const_value(tensor).dtype == value.dtype:
            return tensor
        return gs.Constant(unique_name(graph, tensor.name or hint), np.ascontiguousarray(value))


def mean_subtractions(graph: gs.Graph) -> list[tuple[gs.Node, gs.Node]]:
    """(ReduceMean, Sub) pairs computing x - ReduceMean(x): the candidates."""
    pairs = []
    for node in graph.nodes:
        if node.op != "ReduceMean" or not node.outputs or not node.inputs:
            continue
        sub = next((u for u in node.outputs[0].outputs if u.op == "Sub" and len(u.inputs) == 2
                    and u.inputs[0] is node.inputs[0] and u.inputs[1] is node.outputs[0]), None)
        if sub is not None:
            pairs.append((node, sub))
    return pairs


@register
class FuseLayerNorm(Pass):
    name = "fuse-layernorm"
    kind = PassKind.FLOAT_PRESERVING

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        graph = module.graph
        matches = []
        for mean, sub in mean_subtractions(graph):
            try:
                matches.append(LayerNormMatch(graph, mean, sub, module.opset))
            except Decline as why:
                ctx.remark(mean, f"not fused into LayerNormalization: {why}")
        if matches and module.opset < LAYERNORM_OPSET:
            ctx.remark("model", f"{len(matches)} LayerNorm pattern(s) not fused: LayerNormalization needs opset "
                                f"{LAYERNORM_OPSET}, the model has {module.opset}; run "
                                f"upgrade-opset{{version={LAYERNORM_OPSET}}} first")
            return PassResult(False, {"layernorm-fused": 0})
        for match in matches:
            name = match.nodes[0].name or match.out.name
            gamma = match.parameter(graph, match.gamma, 1.0, f"{name}_scale")
            beta = match.parameter(graph, match.beta, 0.0, f"{name}_bias")
            for node in match.nodes:
                node.inputs.clear()
                node.outputs.clear()
            graph.nodes.append(gs.Node("LayerNormalization", name=name, inputs=[match.x, gamma, beta], outputs=[match.out],
                                       attrs={"axis": -match.k, "epsilon": float(match.eps)}))
        if matches:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(bool(matches), {"layernorm-fused": len(matches)})
