"""Rewrite squeeze-excite blocks into a float-equivalent form that quantizes well (FC layers, [0,1] gate).

A squeeze-excite (SE) block scales each channel of x by a gate computed from the channel means:

    p = GlobalAveragePool(x)                        (N, C, 1, 1)
    h = act(W1 p + b1)                              1x1 Conv, bias inline or a separate Add (paddle2onnx);
                                                    act one node, or Swish written u * Sigmoid(u) (EfficientNet)
    z = W2 h + b2                                   1x1 Conv (+ Add)
    g = HardSigmoid(z; a, b) | Sigmoid(z) | k Clip(s z + t, lo, hi)   (hand-written hard sigmoid)
    y = Mul(x, g)                                   either operand order

QNN quantizes it badly twice over: the 1x1 convolutions run on (N, C, 1, 1) tensors, and the gate's
input z is calibrated over a range far wider than the [0, 1] the gate actually uses. Rewrites:

mode=fc: the layers become fully connected, on (N, C) vectors, and the gate is reshaped back:

    %f = Flatten(%p) {axis=1}
    %h = Gemm(%f, @W1[C1,C], @b1) {transB=1}  ->  act  ->  %z = Gemm(%h, @W2[C,C1], @b2) {transB=1}
    %g = HardSigmoid(%z)
    %gb = Reshape(%g, [N, C, 1, 1])            (keeps the old gate's name, so the Mul is untouched)

mode=fold-gate: a hard sigmoid is an affine map clipped to [0, 1], and the affine part folds into
the second layer:  HardSigmoid(W2 h + b2; a, b) = Clip((a W2) h + (a b2 + b), 0, 1).
A hand-written gate k Clip(s z + t, lo, hi) with k > 0, k lo = 0 and k hi = 1 is the hard sigmoid
with a = k s, b = k t. A Sigmoid stays a Sigmoid (s and t fold into the layer). The gate tensor is
annotated fixed_range=(0, 1) so the quantizer spends its 8 bits on [0, 1] exactly.

mode=fc+fold-gate (default): both. Without fold-gate, the gate is written as one HardSigmoid node
(hand-written forms included) and annotated fixed_range=(0, 1) too. keep-16bit annotates the
block's internal tensors (pool to gate) act_bits=16: they are (N, C) vectors, so 16 bits cost little;
off by default, as it did not help the PP-OCR classifier at W8A8 (docs/measurements.md).

A block already in the wanted form is left alone (FC layers are never turned back into
convolutions). Every GlobalAveragePool followed by a Conv is a candidate, and one not rewritten gets
a remark saying why (conv not 1x1, group != 1, gate shared, the Mul's other input not the block
input, ...); an FC-form chain gets a remark only once it reached its second layer, so classifier
heads (GlobalAveragePool -> Reshape -> MatMul) pass silently. Flatten, Gemm and Reshape exist with
these semantics in every opset from 9; Clip takes attributes below opset 11 and Gemm needs its C
below opset 11 (a zero bias is written then).

Stats: ``se-matched`` (blocks recognised), ``se-rewritten`` (blocks whose nodes changed).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from compiler.encoding import clip_bounds
from compiler.ir import Module, const_value, unique_name
from compiler.linear import channel_constant
from compiler.pass_manager import Pass, PassContext, PassKind, PassResult, choices, register
from compiler.patterns import is_graph_output

SQUEEZE_OPS = frozenset({"Flatten", "Reshape", "Squeeze"})
UNSQUEEZE_OPS = frozenset({"Reshape", "Unsqueeze"})
# Elementwise activations between the two layers: they act on values, not on shapes, so they work
# unchanged on (N, C) vectors (Clip's bounds are scalars).
ACTIVATIONS = frozenset({"Relu", "LeakyRelu", "Clip", "HardSwish"})
AFFINE_OPS = frozenset({"Add", "Sub", "Mul", "Div"})
MAX_GATE_SCALES = 2  # scalar Mul/Div after a hand-written gate's Clip (x6 / 6 spellings)
CLIP_OPSET = 11      # Clip's bounds are inputs from here, attributes before
GEMM_OPTIONAL_C_OPSET = 11


class Decline(Exception):
    """Why a candidate is not an SE block this pass can rewrite; ``late`` once both layers matched."""

    def __init__(self, reason: str, late: bool = False):
        super().__init__(reason)
        self.late = late


def close(value: float, target: float) -> bool:
    return math.isclose(value, target, rel_tol=1e-5, abs_tol=1e-6)


def only_user(graph: gs.Graph, tensor, role: str) -> gs.Node:
    """The one node reading ``tensor``; Decline if it is shared, a graph output or unused."""
    if is_graph_output(graph, tensor):
        raise Decline(f"{role} %{tensor.name} is a graph output")
    users = tensor.outputs
    if len(users) != 1:
        raise Decline(f"{role} %{tensor.name} feeds {len(users)} nodes")
    return users[0]


def float_const(tensor) -> np.ndarray | None:
    value = const_value(tensor) if tensor is not None and tensor.name else None
    return value if value is not None and np.issubdtype(value.dtype, np.floating) else None


def scalar_operand(node: gs.Node, var) -> tuple[int, float] | None:
    """(index of ``var``, the other operand) when ``node`` combines ``var`` with a float scalar
    constant that cannot raise the rank by broadcasting."""
    if len(node.inputs) != 2 or var not in node.inputs:
        return None
    index = 0 if node.inputs[0] is var else 1
    value = float_const(node.inputs[1 - index])
    rank = len(var.shape) if var.shape is not None else 1
    if value is None or value.size != 1 or value.ndim > rank or node.inputs[1 - index] is var:
        return None
    return index, float(value.reshape(-1)[0])


def affine_step(node: gs.Node, var) -> tuple[float, float] | None:
    """(s, t) with node output = s var + t, for Add/Sub/Mul/Div of ``var`` and a scalar."""
    operand = scalar_operand(node, var) if node.op in AFFINE_OPS else None
    if operand is None:
        return None
    index, c = operand
    if node.op == "Add":
        return 1.0, c
    if node.op == "Sub":
        return (1.0, -c) if index == 0 else (-1.0, c)
    if node.op == "Mul":
        return c, 0.0
    return (1.0 / c, 0.0) if index == 0 and c != 0.0 else None


def scale_step(node: gs.Node, var) -> float | None:
    """k with node output = k var, for a Mul or Div of ``var`` by a scalar."""
    step = affine_step(node, var) if node.op in ("Mul", "Div") else None
    return step[0] if step else None


@dataclass
class Layer:
    """One fully connected step, y = W x + b, however it is spelled (Conv 1x1, Gemm, MatMul, + Add)."""
    nodes: list
    weight: np.ndarray        # [Cout, Cin], float64
    bias: np.ndarray | None   # [Cout], float64
    weight_tensor: gs.Tensor
    canonical: bool           # one Conv, or one Gemm(transB=1), with any bias inline

    @property
    def out(self):
        return self.nodes[-1].outputs[0]


@dataclass
class Gate:
    """Gate(z) = HardSigmoid(z; alpha, beta), or Sigmoid(alpha z + beta)."""
    kind: str                 # "hardsigmoid" or "sigmoid"
    alpha: float
    beta: float
    nodes: list               # scalar steps before the anchor, the anchor, scales after it
    after_mul: list = field(default_factory=list)  # scales applied to the Mul's output instead

    @property
    def anchor(self) -> gs.Node:
        return next(n for n in self.nodes if n.op in ("HardSigmoid", "Sigmoid", "Clip"))

    @property
    def simple(self) -> bool:
        """A single node that is the gate as it stands: HardSigmoid, Sigmoid or Clip(0, 1)."""
        if len(self.nodes) != 1 or self.after_mul:
            return False
        node = self.nodes[0]
        return node.op != "Clip" or clip_bounds(node) == (0.0, 1.0)

    @property
    def out(self):
        return self.nodes[-1].outputs[0]


@dataclass
class Block:
    gap: gs.Node
    x: gs.Tensor
    rank: int
    squeeze: gs.Node | None   # Flatten/Reshape/Squeeze to (N, C) when the block is already FC
    fc1: Layer
    act: list                 # one activation node, or Swish's [Sigmoid, Mul]
    fc2: Layer
    gate: Gate
    unsqueeze: gs.Node | None
    mul: gs.Node

    @property
    def fc(self) -> bool:
        return self.squeeze is not None

    @property
    def gate_index(self) -> int:
        """Which input of the Mul is the gate."""
        return 1 if self.mul.inputs[0] is self.x else 0

    def canonical(self, want_fc: bool, fold: bool) -> bool:
        if want_fc and not self.fc:
            return False
        if self.fc and (self.squeeze.op != "Flatten" or self.unsqueeze.op != "Reshape"):
            return False
        if not (self.fc1.canonical and self.fc2.canonical and self.gate.simple):
            return False
        return not (fold and self.gate.kind == "hardsigmoid" and self.gate.anchor.op == "HardSigmoid")

    def tensors(self) -> tuple[list, list]:
        """(internal tensors from the pool to the gate, the gate tensors)."""
        gates = [self.gate.out] + ([self.unsqueeze.outputs[0]] if self.unsqueeze else [])
        internal = [self.gap.outputs[0]] + ([self.squeeze.outputs[0]] if self.squeeze else [])
        internal += [n.outputs[0] for n in self.fc1.nodes + self.act + self.fc2.nodes + self.gate.nodes]
        internal += gates[1:]
        return internal, gates


# --- Matching ------------------------------------------------------------------------------------

def conv_layer(graph: gs.Graph, node: gs.Node, inp, channels: int, rank: int, role: str) -> Layer:
    if node.op != "Conv":
        raise Decline(f"{role} is a {node.op}, not a 1x1 Conv")
    if node.inputs[0] is not inp:
        raise Decline(f"{role} (Conv) reads %{inp.name} as its weight")
    weight = float_const(node.inputs[1])
    if weight is None:
        raise Decline(f"{role} (Conv) has a non-constant weight")
    if weight.ndim != rank or any(k != 1 for k in weight.shape[2:]):
        raise Decline(f"{role} (Conv) has kernel {list(weight.shape[2:])}, not 1x1")
    group = int(node.attrs.get("group", 1))
    if group != 1:
        raise Decline(f"{role} (Conv) has group={group}")
    if any(int(p) != 0 for p in node.attrs.get("pads", [])):
        raise Decline(f"{role} (Conv) pads its 1x1 input")
    if weight.shape[1] != channels:
        raise Decline(f"{role} (Conv) takes {weight.shape[1]} channels, its input has {channels}")
    has_bias = len(node.inputs) > 2 and bool(node.inputs[2].name)
    bias = float_const(node.inputs[2]) if has_bias else None
    if has_bias and bias is None:
        raise Decline(f"{role} (Conv) has a non-constant bias")
    w = weight.astype(np.float64).reshape(weight.shape[:2])
    return with_bias_add(graph, Layer([node], w, None if bias is None else bias.astype(np.float64).reshape(-1),
                                      node.inputs[1], canonical=True), rank, role)


def fc_layer(graph: gs.Graph, node: gs.Node, inp, channels: int, role: str) -> Layer:
    if node.op not in ("Gemm", "MatMul") or node.inputs[0] is not inp:
        raise Decline(f"{role} is not a Gemm or MatMul of %{inp.name}")
    matrix = float_const(node.inputs[1])
    if matrix is None or matrix.ndim != 2:
        raise Decline(f"{role} ({node.op}) has no constant 2-D weight")
    if node.op == "MatMul":
        weight, bias, canonical = matrix.T, None, False
    else:
        if int(node.attrs.get("transA", 0)):
            raise Decline(f"{role} (Gemm) transposes its input")
        trans_b = int(node.attrs.get("transB", 0))
        alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
        weight = alpha * (matrix if trans_b else matrix.T)
        bias, canonical = None, trans_b == 1 and alpha == 1.0 and beta == 1.0
        if len(node.inputs) > 2 and node.inputs[2].name:
            c = float_const(node.inputs[2])
            bias = None if c is None else channel_constant(c, weight.shape[0], 2)
            if bias is None:
                raise Decline(f"{role} (Gemm) has a C that is not a constant per-output bias")
            bias = beta * bias
    if weight.shape[1] != channels:
        raise Decline(f"{role} ({node.op}) takes {weight.shape[1]} features, its input has {channels}")
    return with_bias_add(graph, Layer([node], weight.astype(np.float64), bias, node.inputs[1], canonical), 2, role)


def with_bias_add(graph: gs.Graph, layer: Layer, rank: int, role: str) -> Layer:
    """Absorb a following Add of a constant per-channel bias (paddle2onnx writes Conv biases so)."""
    out = layer.out
    if len(out.outputs) != 1 or is_graph_output(graph, out):
        return layer  # read twice (Swish) or an output: no bias Add to absorb; the activation match says more
    user = out.outputs[0]
    operand = [t for t in user.inputs if t is not out] if user.op == "Add" and len(user.inputs) == 2 else []
    value = float_const(operand[0]) if len(operand) == 1 else None
    if value is None:
        return layer
    vector = channel_constant(value, layer.weight.shape[0], rank)
    if vector is None:
        return layer
    bias = vector if layer.bias is None else layer.bias + vector
    return Layer(layer.nodes + [user], layer.weight, bias, layer.weight_tensor, canonical=False)


def squeeze_to_vectors(graph: gs.Graph, pooled) -> gs.Node | None:
    """The node flattening the pooled (N, C, 1, 1) tensor to (N, C), if that is what reads it."""
    users = pooled.outputs
    if len(users) != 1 or is_graph_output(graph, pooled) or users[0].op not in SQUEEZE_OPS:
        return None
    node = users[0]
    if node.inputs[0] is not pooled or (node.op == "Flatten" and int(node.attrs.get("axis", 1)) != 1):
        return None
    shape, channels = node.outputs[0].shape, pooled.shape[1] if pooled.shape else None
    return node if shape is not None and len(shape) == 2 and shape[1] == channels else None


def read_gate(graph: gs.Graph, z, x) -> tuple[Gate, gs.Node | None, gs.Node]:
    """(gate reading ``z`` with any scalar steps around it, the node reshaping it back to x's rank
    if any, the Mul applying it to ``x``)."""
    s, t, nodes, tensor = 1.0, 0.0, [], z
    node = only_user(graph, tensor, "the second layer's output")
    while (step := affine_step(node, tensor)) is not None:
        s, t = step[0] * s, step[0] * t + step[1]
        nodes.append(node)
        tensor = node.outputs[0]
        node = only_user(graph, tensor, "the gate's input")
    if node.op not in ("HardSigmoid", "Sigmoid", "Clip") or node.inputs[0] is not tensor:
        raise Decline(f"the second layer feeds a {node.op}, not a HardSigmoid, Sigmoid or Clip gate")
    anchor = node
    nodes.append(anchor)
    tensor = anchor.outputs[0]
    k, scales = 1.0, 0
    node = only_user(graph, tensor, "the gate")
    while scales < MAX_GATE_SCALES and (factor := scale_step(node, tensor)) is not None:
        k, scales = k * factor, scales + 1
        nodes.append(node)
        tensor = node.outputs[0]
        node = only_user(graph, tensor, "the gate")
    if anchor.op == "HardSigmoid":
        a, b = float(anchor.attrs.get("alpha", 0.2)), float(anchor.attrs.get("beta", 0.5))
        gate = Gate("hardsigmoid", a * s, a * t + b, nodes)
    elif anchor.op == "Sigmoid":
        gate = Gate("sigmoid", s, t, nodes)
    else:
        bounds = clip_bounds(anchor)
        if bounds is None:
            raise Decline("the gate Clip has non-constant bounds")
        gate = Gate("hardsigmoid", s, t, nodes)  # alpha, beta scaled by k once k is known
    if anchor.op != "Clip" and k != 1.0:
        raise Decline(f"the {anchor.op} gate is scaled by {k:g}")
    unsqueeze = None
    if node.op in UNSQUEEZE_OPS and len(tensor.shape or ()) == 2:
        out_shape = node.outputs[0].shape
        if out_shape is None or len(out_shape) != len(x.shape or ()) or list(out_shape[1:]) != [tensor.shape[1]] + [1] * (len(out_shape) - 2):
            raise Decline(f"the gate's {node.op} does not give ({', '.join(['N', str(tensor.shape[1])] + ['1'] * (len(x.shape or ()) - 2))})")
        unsqueeze = node
        node = only_user(graph, node.outputs[0], "the gate")
    if node.op != "Mul" or len(node.inputs) != 2:
        raise Decline(f"the gate feeds a {node.op}, not a Mul with the block input")
    gate_tensor = unsqueeze.outputs[0] if unsqueeze else tensor
    other = node.inputs[1] if node.inputs[0] is gate_tensor else node.inputs[0]
    if other is not x:
        raise Decline(f"the gate's Mul multiplies %{other.name}, not the block input %{x.name}")
    if anchor.op == "Clip":
        lo, hi = clip_bounds(anchor)
        after = []
        tensor = node.outputs[0]
        while not (k > 0 and close(k * hi, 1.0)) and scales < MAX_GATE_SCALES and not is_graph_output(graph, tensor) \
                and len(tensor.outputs) == 1 and (factor := scale_step(tensor.outputs[0], tensor)) is not None:
            k, scales = k * factor, scales + 1
            after.append(tensor.outputs[0])
            tensor = after[-1].outputs[0]
        if not (k > 0 and close(k * lo, 0.0) and close(k * hi, 1.0)):
            raise Decline(f"the gate {k:g}*Clip(., {lo:g}, {hi:g}) ranges over [{k * lo:g}, {k * hi:g}], not [0, 1]")
        gate.alpha, gate.beta, gate.after_mul = k * s, k * t, after
    return gate, unsqueeze, node


def swish_nodes(graph: gs.Graph, u) -> list | None:
    """[Sigmoid, Mul] when ``u`` is read exactly by Sigmoid(u) and Mul(u, Sigmoid(u)) (either order): Swish."""
    users = u.outputs
    if len(users) != 2 or is_graph_output(graph, u):
        return None
    sigmoid = next((n for n in users if n.op == "Sigmoid"), None)
    mul = next((n for n in users if n.op == "Mul" and len(n.inputs) == 2), None)
    if sigmoid is None or mul is None:
        return None
    gate = sigmoid.outputs[0]
    if set(map(id, mul.inputs)) != {id(u), id(gate)} or gate.outputs != [mul] or is_graph_output(graph, gate):
        return None
    return [sigmoid, mul]


def match_activation(graph: gs.Graph, h) -> list:
    """The activation between the two layers: one node of ACTIVATIONS, or Swish's [Sigmoid, Mul]."""
    swish = swish_nodes(graph, h)
    if swish is not None:
        return swish
    act = only_user(graph, h, "the first layer's output")
    if act.op not in ACTIVATIONS or act.inputs[0] is not h or any(
            t.name and const_value(t) is None for t in act.inputs[1:]):
        raise Decline(f"the first layer feeds a {act.op}, not an activation ({', '.join(sorted(ACTIVATIONS))} or Swish)")
    return [act]


def match_block(graph: gs.Graph, gap: gs.Node) -> Block:
    """The SE block starting at ``gap``; raises Decline with the reason it is not one."""
    x, pooled = gap.inputs[0], gap.outputs[0]
    rank = len(x.shape) if x.shape is not None else 0
    if rank < 3:
        raise Decline(f"the pooled tensor %{x.name} has {'unknown rank' if not rank else f'rank {rank}'}")
    channels = x.shape[1]
    if not isinstance(channels, int):
        raise Decline(f"%{x.name} has a dynamic channel count")
    squeeze = squeeze_to_vectors(graph, pooled)
    if squeeze is None:
        first = only_user(graph, pooled, "the pooled tensor")
        fc1 = conv_layer(graph, first, pooled, channels, rank, "the first layer")
    else:
        first = only_user(graph, squeeze.outputs[0], "the flattened pool")
        fc1 = fc_layer(graph, first, squeeze.outputs[0], channels, "the first layer")
    act = match_activation(graph, fc1.out)
    second = only_user(graph, act[-1].outputs[0], "the activation")
    hidden = fc1.weight.shape[0]
    if squeeze is None:
        fc2 = conv_layer(graph, second, act[-1].outputs[0], hidden, rank, "the second layer")
    else:
        fc2 = fc_layer(graph, second, act[-1].outputs[0], hidden, "the second layer")
    if fc2.weight.shape[0] != channels:
        raise Decline(f"the second layer gives {fc2.weight.shape[0]} channels, the block input has {channels}")
    try:
        gate, unsqueeze, mul = read_gate(graph, fc2.out, x)
    except Decline as why:
        raise Decline(str(why), late=True) from None
    if (squeeze is None) != (unsqueeze is None):
        raise Decline("the gate is not reshaped back to the block input's rank", late=True)
    return Block(gap, x, rank, squeeze, fc1, act, fc2, gate, unsqueeze, mul)


# --- Rewriting -----------------------------------------------------------------------------------

class Builder:
    """New nodes and tensors for one block, named after the tensors they replace."""

    def __init__(self, graph: gs.Graph, dtype):
        self.graph, self.dtype, self.nodes = graph, dtype, []

    def tensor(self, hint: str, shape) -> gs.Variable:
        return gs.Variable(unique_name(self.graph, hint), dtype=self.dtype, shape=shape)

    def const(self, hint: str, values: np.ndarray, reuse=None) -> gs.Tensor:
        """A constant holding ``values``; ``reuse`` when it already holds exactly them."""
        old = const_value(reuse) if reuse is not None else None
        if old is not None and old.shape == values.shape and old.dtype == values.dtype and np.array_equal(old, values):
            return reuse
        # Not make_const: np.ascontiguousarray would turn Clip's scalar bounds into shape [1].
        return gs.Constant(unique_name(self.graph, hint), values)

    def node(self, op: str, inputs: list, out, attrs: dict | None = None) -> gs.Variable:
        self.nodes.append(gs.Node(op, unique_name(self.graph, f"{out.name}/{op}"), attrs or {}, inputs, [out]))
        return out


def rebuild(module: Module, block: Block, fc: bool, fold: bool) -> None:
    """Replace the block's nodes between the pool and the Mul with the canonical form."""
    graph, x, gate = module.graph, block.x, block.gate
    to_fc = fc and not block.fc
    fc = fc or block.fc
    b = Builder(graph, x.dtype)
    batch = x.shape[0]
    spatial = [1] * (block.rank - 2)
    channels, hidden = block.fc2.weight.shape[0], block.fc1.weight.shape[0]

    def shape(width: int) -> list:
        return [batch, width] if fc else [batch, width] + spatial

    def renamed(tensor, suffix: str, width: int):
        return b.tensor(f"{tensor.name}{suffix}", shape(width)) if suffix else tensor

    w2, b2 = block.fc2.weight, block.fc2.bias
    if gate.kind == "sigmoid" or fold:
        scale, shift = gate.alpha, gate.beta  # folded into the second layer
    else:
        scale, shift = 1.0, 0.0
    folded = scale != 1.0 or shift != 0.0
    if folded:
        w2, b2 = scale * w2, scale * (b2 if b2 is not None else np.zeros(channels)) + shift
    layout = "_fc" if to_fc else ""  # tensors change shape: new names

    def layer(inp, spec: Layer, weight, bias, out, hint: str) -> None:
        dtype = np.dtype(spec.weight_tensor.dtype or np.float32)
        inline_bias = spec.nodes[0].inputs[2] if len(spec.nodes[0].inputs) > 2 else None
        if fc:
            op, attrs = "Gemm", {"transB": 1}
            if bias is None and module.opset < GEMM_OPTIONAL_C_OPSET:
                bias = np.zeros(weight.shape[0])
        else:
            op, attrs = "Conv", {"kernel_shape": list(spatial)}
            weight = weight.reshape(weight.shape + tuple(spatial))
        inputs = [inp, b.const(hint, weight.astype(dtype), spec.weight_tensor)]
        if bias is not None:
            inputs.append(b.const(f"{hint}_bias", bias.astype(dtype), inline_bias))
        b.node(op, inputs, out, attrs)

    # Tensors keep their names where value and shape are unchanged.
    gate_kept = not gate.after_mul  # gate.out holds the gate itself, not a multiple of it
    mul_gate = block.mul.inputs[block.gate_index]
    h1 = renamed(block.fc1.out, layout, hidden)
    a1 = renamed(block.act[-1].outputs[0], layout, hidden)
    z = renamed(block.fc2.out, layout + ("_folded" if folded else ""), channels)
    g = renamed(gate.out, layout if gate_kept else layout + "_gate", channels)
    if fc:
        g_back = mul_gate if gate_kept else b.tensor(f"{mul_gate.name}_gate", [batch, channels] + spatial)
    else:
        g_back = g

    pooled = block.gap.outputs[0]
    inp = b.node("Flatten", [pooled], b.tensor(f"{pooled.name}_flat", [batch, channels]), {"axis": 1}) if fc else pooled
    gemm = "_fc" if fc else ""  # new constants are in Gemm layout (the original ones are reused where equal)
    layer(inp, block.fc1, block.fc1.weight, block.fc1.bias, h1, f"{block.fc1.weight_tensor.name}{gemm}")
    if len(block.act) == 2:  # Swish: the Mul keeps its operand order
        sigmoid, mul = block.act
        s1 = b.node("Sigmoid", [h1], renamed(sigmoid.outputs[0], layout, hidden))
        b.node("Mul", [h1 if t is block.fc1.out else s1 for t in mul.inputs], a1)
    else:
        act = block.act[0]
        b.node(act.op, [h1] + list(act.inputs[1:]), a1, dict(act.attrs))
    layer(a1, block.fc2, w2, b2, z, f"{block.fc2.weight_tensor.name}{gemm}{'_folded' if folded else ''}")
    if gate.kind == "sigmoid":
        b.node("Sigmoid", [z], g)
    elif fold or (gate.alpha == 1.0 and gate.beta == 0.0):
        if module.opset >= CLIP_OPSET:
            zero, one = (b.const(f"{g.name}_{n}", np.array(v, dtype=np.dtype(x.dtype))) for n, v in (("min", 0.0), ("max", 1.0)))
            b.node("Clip", [z, zero, one], g)
        else:
            b.node("Clip", [z], g, {"min": 0.0, "max": 1.0})
    else:
        b.node("HardSigmoid", [z], g, {"alpha": gate.alpha, "beta": gate.beta})
    if fc:
        target = np.array([batch if isinstance(batch, int) else -1, channels] + spatial, dtype=np.int64)
        b.node("Reshape", [g, b.const(f"{g_back.name}_shape", target)], g_back)

    old = [n for n in [block.squeeze, block.unsqueeze] if n] + block.fc1.nodes + block.act + block.fc2.nodes + gate.nodes
    result = gate.after_mul[-1].outputs[0] if gate.after_mul else None
    for node in old + gate.after_mul:
        node.inputs.clear()
        node.outputs.clear()
    if result is not None:
        block.mul.outputs.clear()
        block.mul.outputs.append(result)
    block.mul.inputs[block.gate_index] = g_back
    graph.nodes.extend(b.nodes)


@register
class ReplaceSE(Pass):
    name = "replace-se"
    kind = PassKind.FLOAT_PRESERVING

    @dataclass(frozen=True)
    class Options:
        mode: str = choices("fc+fold-gate", "fc", "fold-gate", default="fc+fold-gate")
        keep_16bit: bool = False

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        graph = module.graph
        fc, fold = "fc" in self.options.mode.split("+"), "fold-gate" in self.options.mode.split("+")
        matched = rewritten = annotated = 0
        for gap in [n for n in graph.nodes if n.op == "GlobalAveragePool"]:
            pooled = gap.outputs[0]
            conv_form = any(u.op == "Conv" for u in pooled.outputs)
            if not conv_form and squeeze_to_vectors(graph, pooled) is None:
                continue
            try:
                block = match_block(graph, gap)
            except Decline as why:
                if conv_form or why.late:
                    ctx.remark(gap, f"SE block not rewritten: {why}")
                continue
            matched += 1
            if not block.canonical(fc, fold):
                rebuild(module, block, fc, fold)
                block = match_block(graph, gap)
                rewritten += 1
            internal, gates = block.tensors()
            hints = [(t.name, {"fixed_range": (0.0, 1.0)}) for t in gates]
            if self.options.keep_16bit:
                hints += [(t.name, {"act_bits": 16}) for t in internal]
            for name, hint in hints:
                if any(module.annotations.get(name, {}).get(k) != v for k, v in hint.items()):
                    module.annotate(name, **hint)
                    annotated += 1
        if rewritten:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(rewritten + annotated > 0, {"se-matched": matched, "se-rewritten": rewritten})
