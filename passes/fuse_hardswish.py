"""Fuse hand-written HardSwish and HardSigmoid (Clip-based) into the single ONNX ops.

    HardSigmoid(x; alpha, beta) = Clip(alpha x + beta, 0, 1)
    HardSwish(x) = x HardSigmoid(x; 1/6, 1/2) = x Clip(x + 3, 0, 6) / 6

Exporters spell these with elementwise ops, in several orders. The pass anchors on each Clip
(constant bounds lo, hi) or HardSigmoid node and reads the expression around it:

    z = a x + b        through scalar Add / Sub / Mul / Div before the anchor (any number, any order)
    g = k Clip(z, lo, hi)  with k from up to two scalar Mul / Div after it, before or after a Mul(x, .)

With k > 0, k Clip(z, 0, hi) = Clip(k z, 0, k hi), so the gate is HardSigmoid(x; k a, k b) when
lo = 0 and k hi = 1, and ``x * gate`` is HardSwish when moreover k a = 1/6 and k b = 1/2:

    %a = Add(%x, 3)                                      (paddle2onnx)
    %c = Clip(%a, 0, 6)
    %m = Mul(%x, %c)                         ->     %y = HardSwish(%x)
    %y = Div(%m, 6)

Also matched: Div or Mul-by-1/6 before the Mul, either operand order, and
``Mul(x, HardSigmoid(x; 1/6, 1/2))``. A gate that multiplies another tensor (squeeze-excite)
becomes ``Mul(other, HardSigmoid(x))``. The rewritten tensors must feed nothing else; the output
keeps its name. HardSwish needs opset 14: below it, HardSwish matches are left alone with one
remark (run upgrade-opset{version=14} first); HardSigmoid exists in every supported opset.
Near-matches (x Clip(x + 3, 0, 5) / 6, an intermediate with another consumer) get a remark.

Stats: ``hardswish-fused``, ``hardsigmoid-fused``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from compiler.ir import Module, const_value, unique_name
from compiler.pass_manager import Pass, PassContext, PassKind, PassResult, register
from compiler.patterns import affine_of, close, has_single_consumer, producer, scalar, variable_and_scalar

HARDSWISH_OPSET = 14
MAX_SCALES = 2  # scalar Mul/Div after the anchor


def clip_bounds(node: gs.Node) -> tuple | None:
    if node.op == "HardSigmoid":
        return 0.0, 1.0
    if "min" in node.attrs or "max" in node.attrs or len(node.inputs) == 1:  # opset < 11: attributes
        return float(node.attrs.get("min", -np.inf)), float(node.attrs.get("max", np.inf))
    bounds = []
    for index in (1, 2):
        if index >= len(node.inputs) or not node.inputs[index].name:
            bounds.append(-np.inf if index == 1 else np.inf)
            continue
        value = scalar(node.inputs[index], node.inputs[0])
        if value is None:
            return None
        bounds.append(value)
    return tuple(bounds)


@dataclass
class BackStep:
    """Anchor input = a * tensor + b, through ``nodes`` (in dataflow order)."""
    tensor: gs.Tensor
    a: float
    b: float
    nodes: list


@dataclass
class ForwardStep:
    node: gs.Node
    k: float
    partner: gs.Tensor | None
    partner_first: bool = False  # partner was the Mul's first operand


@dataclass
class Expression:
    anchor: gs.Node
    lo: float
    hi: float
    back: list = field(default_factory=list)
    forward: list = field(default_factory=list)


def read_expression(anchor: gs.Node) -> Expression | None:
    bounds = clip_bounds(anchor)
    if bounds is None or not anchor.inputs or not anchor.outputs:
        return None
    if anchor.op == "HardSigmoid":
        a, b = float(anchor.attrs.get("alpha", 0.2)), float(anchor.attrs.get("beta", 0.5))
    else:
        a, b = 1.0, 0.0
    expr = Expression(anchor, *bounds)
    tensor, nodes, seen = anchor.inputs[0], [], set()
    expr.back.append(BackStep(tensor, a, b, []))
    while (node := producer(tensor)) is not None and id(node) not in seen and (step := affine_of(node)) is not None:
        seen.add(id(node))
        tensor, p, q = step
        a, b, nodes = a * p, a * q + b, [node] + nodes
        expr.back.append(BackStep(tensor, a, b, nodes))
    tensor, k, partner, first, scales = anchor.outputs[0], 1.0, None, False, 0
    while (step := next_forward(tensor, k, partner, first)) is not None:
        if step.partner is partner:
            if scales == MAX_SCALES:
                break
            scales += 1
        expr.forward.append(step)
        tensor, k, partner, first = step.node.outputs[0], step.k, step.partner, step.partner_first
    return expr


def next_forward(tensor, k: float, partner, first: bool) -> ForwardStep | None:
    """The consumer of ``tensor`` that continues the gate: a scalar Mul/Div, or (once) a Mul by another tensor."""
    for user in tensor.outputs:
        if user.op not in ("Mul", "Div"):
            continue
        var, index, c = variable_and_scalar(user)
        if var is tensor and (user.op == "Mul" or (index == 0 and c != 0.0)):
            return ForwardStep(user, k * c if user.op == "Mul" else k / c, partner, first)
        if user.op == "Mul" and partner is None and len(user.inputs) == 2:
            other = user.inputs[1] if user.inputs[0] is tensor else user.inputs[0]
            if other is not tensor and const_value(other) is None:
                return ForwardStep(user, k, other, user.inputs[0] is other)
    return None


@dataclass
class Match:
    kind: str              # "HardSwish" or "HardSigmoid"
    base: gs.Tensor
    nodes: list            # every node the rewrite replaces
    output: gs.Tensor
    alpha: float = 0.0
    beta: float = 0.0
    partner: gs.Tensor | None = None  # HardSigmoid gate multiplying another tensor
    partner_first: bool = False


def shared(graph: gs.Graph, tensors) -> gs.Tensor | None:
    return next((t for t in tensors if not has_single_consumer(graph, t)), None)


def describe_gate(k: float, a: float, b: float, lo: float, hi: float) -> str:
    return f"{k:.6g} * Clip({a:.6g} * x + {b:.6g}, {lo:.6g}, {hi:.6g})"


def find_match(graph: gs.Graph, expr: Expression) -> tuple[Match | None, str]:
    """The longest rewrite of the expression, or (None, a near-miss explanation or '')."""
    near_miss = ""
    anchor_out = expr.anchor.outputs[0]
    for length in range(len(expr.forward), -1, -1):
        prefix = expr.forward[:length]
        k = prefix[-1].k if prefix else 1.0
        partner = prefix[-1].partner if prefix else None
        output = prefix[-1].node.outputs[0] if prefix else anchor_out
        inner_forward = [anchor_out] + [f.node.outputs[0] for f in prefix[:-1]] if prefix else []
        forward_nodes = [f.node for f in prefix]
        partner_at = next((j for j, step in enumerate(expr.back) if step.tensor is partner), None)
        if partner_at is not None:
            step = expr.back[partner_at]
            gate = describe_gate(k, step.a, step.b, expr.lo, expr.hi)
            if close(expr.lo, 0.0) and k > 0 and close(k * expr.hi, 1.0) and close(k * step.a, 1 / 6) and close(k * step.b, 0.5):
                blocker = shared(graph, [s.tensor for s in expr.back[:partner_at]] + inner_forward)
                if blocker is None:
                    return Match("HardSwish", partner, step.nodes + [expr.anchor] + forward_nodes, output), ""
                near_miss = near_miss or f"x * {gate} is HardSwish, not fused: intermediate %{blocker.name} has another consumer"
            elif partner_at > 0 or expr.anchor.op == "HardSigmoid":
                near_miss = near_miss or f"x * {gate} is not HardSwish (needs lo = 0 and k*hi = 1, k*a = 1/6, k*b = 1/2)"
        if not (close(expr.lo, 0.0) and k > 0 and close(k * expr.hi, 1.0)):
            if length and partner is None and len(expr.back) > 1:
                step = expr.back[-1]
                near_miss = near_miss or f"{describe_gate(k, step.a, step.b, expr.lo, expr.hi)} is not HardSigmoid (k*hi != 1)"
            continue
        if shared(graph, inner_forward) is not None:
            continue
        depth = 0
        while depth + 1 < len(expr.back) and has_single_consumer(graph, expr.back[depth].tensor):
            depth += 1
        step = expr.back[depth]
        nodes = step.nodes + [expr.anchor] + forward_nodes
        if len(nodes) <= 1 + (partner is not None):
            continue  # nothing to gain: already a single HardSigmoid (times the other tensor)
        if expr.anchor.op == "Clip" and not step.nodes:
            continue  # Clip(x, 0, hi) / hi: a scaled Relu6, not an exporter's HardSigmoid
        return Match("HardSigmoid", step.tensor, nodes, output, k * step.a, k * step.b, partner,
                     prefix[-1].partner_first if prefix else False), ""
    return None, near_miss


def rewrite(graph: gs.Graph, match: Match) -> None:
    output = match.output
    for node in match.nodes:
        node.inputs.clear()
        node.outputs.clear()
    if match.kind == "HardSwish":
        graph.nodes.append(gs.Node("HardSwish", unique_name(graph, f"{output.name}_hardswish"),
                                   inputs=[match.base], outputs=[output]))
        return
    attrs = {"alpha": float(np.float32(match.alpha)), "beta": float(np.float32(match.beta))}
    if match.partner is None:
        graph.nodes.append(gs.Node("HardSigmoid", unique_name(graph, f"{output.name}_hardsigmoid"), attrs=attrs,
                                   inputs=[match.base], outputs=[output]))
        return
    gate = gs.Variable(unique_name(graph, f"{output.name}_gate"), dtype=output.dtype, shape=match.base.shape)
    graph.nodes.append(gs.Node("HardSigmoid", unique_name(graph, f"{output.name}_hardsigmoid"), attrs=attrs,
                               inputs=[match.base], outputs=[gate]))
    operands = [match.partner, gate] if match.partner_first else [gate, match.partner]
    graph.nodes.append(gs.Node("Mul", unique_name(graph, f"{output.name}_mul"), inputs=operands, outputs=[output]))


@register
class FuseHardSwish(Pass):
    name = "fuse-hardswish"
    kind = PassKind.FLOAT_PRESERVING

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        graph = module.graph
        graph.toposort()
        stats = {"hardswish-fused": 0, "hardsigmoid-fused": 0}
        declined_for_opset = 0
        for anchor in [n for n in graph.nodes if n.op in ("Clip", "HardSigmoid")]:
            if not anchor.outputs:
                continue  # removed by an earlier rewrite
            expr = read_expression(anchor)
            if expr is None:
                continue
            match, near_miss = find_match(graph, expr)
            if match is None:
                if near_miss:
                    ctx.remark(anchor, near_miss)
                continue
            if match.kind == "HardSwish" and module.opset < HARDSWISH_OPSET:
                declined_for_opset += 1
                continue
            rewrite(graph, match)
            stats["hardswish-fused" if match.kind == "HardSwish" else "hardsigmoid-fused"] += 1
        if declined_for_opset:
            ctx.remark("model", f"{declined_for_opset} HardSwish pattern(s) not fused: HardSwish needs opset "
                                f"{HARDSWISH_OPSET}, the model has {module.opset}; run upgrade-opset{{version={HARDSWISH_OPSET}}} first")
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(sum(stats.values()) > 0, stats)
