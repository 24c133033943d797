"""Fuse Erf-Gelu written with elementwise ops into one Gelu op (QNN's HTP backend has no Erf).

    Gelu(x) = 0.5 x (1 + erf(x / sqrt(2)))

PyTorch below opset 20 and TensorFlow export it as

    %d = Div(%x, 1.4142135)            or Mul(%x, 0.70710677)
    %e = Erf(%d)
    %t = Add(%e, 1)                    either operand order
    %m = Mul(%x, %t)           ->      %y = Gelu(%x)
    %y = Mul(%m, 0.5)                  or Div(%m, 2)

and also as Mul(x, Mul(t, 0.5)) or Mul(Mul(x, 0.5), t). The pass anchors on each Erf and writes
ONNX's Gelu from opset 20, below it onnxruntime's com.microsoft Gelu (the same function; onnxruntime's
CPU and QNN execution providers run it). The intermediate tensors must feed nothing else; the output
keeps its name. An Erf that is not such a Gelu gets a remark saying why, among them the form whose 0.5
fold-affine moved into the next layer (run fuse-gelu before fold-affine).

Stats: ``gelu-fused``.
"""
from __future__ import annotations

import math

import onnx_graphsurgeon as gs

from compiler.ir import Module
from compiler.pass_manager import Pass, PassContext, PassKind, PassResult, register
from compiler.patterns import Decline, affine_of, close, has_single_consumer, producer, single_user

GELU_OPSET = 20  # Gelu is an ONNX op from here
CONTRIB_DOMAIN = "com.microsoft"


def scales(node: gs.Node | None, var, factor: float) -> bool:
    """``node`` computes ``factor * var`` (a scalar Mul or Div)."""
    step = affine_of(node) if node is not None and node.op in ("Mul", "Div") else None
    return step is not None and step[0] is var and close(step[1], factor) and step[2] == 0.0


def product_of(node: gs.Node, a, b) -> bool:
    return node.op == "Mul" and len(node.inputs) == 2 and {id(t) for t in node.inputs} == {id(a), id(b)}


def match_gelu(graph: gs.Graph, erf: gs.Node) -> tuple:
    """(x, the nodes computing Gelu(x), the output tensor) for the Gelu around ``erf``; Decline otherwise."""
    scaled = erf.inputs[0]
    pre = producer(scaled)
    step = affine_of(pre) if pre is not None and pre.op in ("Mul", "Div") else None
    if step is None or not close(step[1], 1.0 / math.sqrt(2.0)) or step[2] != 0.0:
        raise Decline("its input is not x / sqrt(2)")
    x = step[0]
    single_user(graph, scaled, "the scaled input")
    add = single_user(graph, erf.outputs[0], "the Erf's output")
    step = affine_of(add) if add.op == "Add" else None
    if step is None or step[0] is not erf.outputs[0] or step[1] != 1.0 or not close(step[2], 1.0):
        raise Decline(f"its output feeds a {add.op}, not 1 + erf")
    t = add.outputs[0]
    user = single_user(graph, t, "1 + erf")
    nodes = [pre, erf, add, user]
    if scales(user, t, 0.5):                                      # Mul(x, 0.5 (1 + erf))
        last = single_user(graph, user.outputs[0], "0.5 (1 + erf)")
        if not product_of(last, x, user.outputs[0]):
            raise Decline("0.5 (1 + erf) does not multiply x")
    elif product_of(user, x, t):                                  # Mul(x (1 + erf), 0.5)
        product = user.outputs[0]
        last = product.outputs[0] if has_single_consumer(graph, product) else None
        if not scales(last, product, 0.5):
            raise Decline("x (1 + erf(x / sqrt(2))) is not scaled by 0.5 (fold-affine folds that 0.5 into the "
                          "next layer: run fuse-gelu before it)")
    else:                                                         # Mul(0.5 x, 1 + erf)
        two_inputs = user.op == "Mul" and len(user.inputs) == 2
        half = (user.inputs[1] if user.inputs[0] is t else user.inputs[0]) if two_inputs else None
        half_node = producer(half) if half is not None else None
        if half_node is None or not scales(half_node, x, 0.5) or not has_single_consumer(graph, half):
            raise Decline("1 + erf does not multiply x and 0.5")
        nodes.insert(0, half_node)
        last = user
    if last is not user:
        nodes.append(last)
    return x, nodes, last.outputs[0]


@register
class FuseGelu(Pass):
    name = "fuse-gelu"
    kind = PassKind.FLOAT_PRESERVING

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        graph = module.graph
        domain = "" if module.opset >= GELU_OPSET else CONTRIB_DOMAIN
        fused = 0
        for erf in [n for n in graph.nodes if n.op == "Erf"]:
            try:
                x, nodes, out = match_gelu(graph, erf)
            except Decline as why:
                ctx.remark(erf, f"not fused into Gelu: {why}")
                continue
            for node in nodes:
                node.inputs.clear()
                node.outputs.clear()
            graph.nodes.append(gs.Node("Gelu", name=erf.name, inputs=[x], outputs=[out], domain=domain))
            fused += 1
        if fused:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(fused > 0, {"gelu-fused": fused})
