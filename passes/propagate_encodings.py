"""Share encodings across data-movement ops and fuse activations into their producers' encodings.

1. Shared encodings (compiler.encoding.SHARED_ENCODING_OPS). The float tensors each table row
   names (MaxPool in/out, Reshape in/out, every Concat input with its output, ...) are joined into
   groups, transitively across the graph, so MaxPool -> Reshape -> Concat is one group. A group's
   encoding covers the union of its members' ranges at the widest member bit-width:

       enc(group) = activation_encoding(min_i lo_i, max_i hi_i, max_i bw_i)

   For Concat this is the output's range, applied to every input. A member with a fixed range (a
   ``fixed_range`` annotation or a fixed-range op such as Sigmoid) dictates the group's encoding
   when every member's range fits in it (Sigmoid -> Reshape); when others exceed it (Concat of a
   Sigmoid and a Conv output), the fixed member keeps its own encoding and the rest share theirs.
   QNN then moves the data without requantizing.

2. Activation fusion (compiler.encoding.FUSIBLE_PRODUCERS / FUSED_ACTIVATIONS). A Conv, Gemm,
   MatMul, Add, ... whose output feeds only a Relu or Clip takes the activation's encoding, so the
   producer's quantizer clamps exactly as the activation does and QNN fuses the pair:

       %c = Conv(%x, @w)  enc(c) = [-4.6, 5.9]        %c = Conv(%x, @w)  enc(c) = [0, 5.9]
       %r = Relu(%c)      enc(r) = [0, 5.9]     ->    %r = Relu(%c)      enc(r) = [0, 5.9]

3. Saturation clamp (compiler.encoding.saturation_bounds). A tensor whose only consumer is a
   saturating activation keeps only the input interval where that activation still changes:
   HardSwish is 0 for every x <= -3, so its input's encoding starts at -3 (a Conv output calibrated
   to [-111, 83] gets [-3, 83]: 1.6x finer steps, same result); HardSigmoid beyond
   (-beta/alpha, (1-beta)/alpha); Sigmoid and Tanh beyond the point where the output is within
   a quarter step of its limit. Tensors in a shared-encoding group or with a fixed range are left alone.

4. Scalar affine maps (``y = a*x + b`` by one Mul, Div, Add or Sub with a scalar constant, or a Neg),
   such as the learnable affine blocks PP-LCNetV3 puts after each HardSwish. The output takes the
   input's grid mapped through the op, so HTP moves the codes without rounding them again: scale |a|*s,
   the offset mirrored when a < 0 and moved by round(b / scale). A b off that grid becomes a constant
   shift of at most half a step, which bias correction downstream removes; requantizing to the output's
   own calibrated grid instead adds rounding noise (0.29 step rms) to every element. An output whose
   encoding an earlier rule set, or whose mapped grid would not hold zero, keeps its own. On PP-OCR
   det W8A8 this raised the output SQNR on every fold tried (docs/measurements.md).

Runs between calibrate and insert-qdq; a graph that already has QDQ nodes is left alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from compiler.calibration import is_float
from compiler.encoding import (ALL, FUSED_ACTIVATIONS, FUSIBLE_PRODUCERS, SHARED_ENCODING_OPS, Encoding,
                               activation_encoding, fixed_ranges, has_qdq, range_encoding, saturation_bounds,
                               union_encoding)
from compiler.ir import Module, const_value
from compiler.pass_manager import Pass, PassContext, PassKind, PassResult, register
from compiler.patterns import constant_operand, has_single_consumer
from passes.insert_qdq import qdq_simulation


def _pick(tensors: list, indices) -> list:
    chosen = tensors if indices == ALL else [tensors[i] for i in indices if i < len(tensors)]
    return [t for t in chosen if t.name and is_float(t) and const_value(t) is None]


def _components(links: list[list[str]]) -> list[list[str]]:
    """Connected components (union-find) of the graph whose edges join each link's members, in first-seen order."""
    parent: dict[str, str] = {}

    def find(name: str) -> str:
        parent.setdefault(name, name)
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    for link in links:
        roots = [find(n) for n in link]
        for root in roots[1:]:
            if root != roots[0]:
                parent[root] = roots[0]
    members: dict[str, list[str]] = {}
    for name in parent:
        members.setdefault(find(name), []).append(name)
    return list(members.values())


@register
class PropagateEncodings(Pass):
    name = "propagate-encodings"
    kind = PassKind.ANNOTATING
    after = ("calibrate", "bias-correction", "adaround", "brecq")

    @dataclass(frozen=True)
    class Options:
        fuse_activations: bool = True

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        if has_qdq(module.graph):
            ctx.remark("graph", "already has QuantizeLinear/DequantizeLinear nodes; propagate-encodings runs before insert-qdq")
            return PassResult(False)
        encodings = module.encodings
        fixed = fixed_ranges(module)
        changed: set[str] = set()

        links = []
        for node in module.graph.nodes:
            rule = SHARED_ENCODING_OPS.get(node.op)
            if rule is None:
                continue
            members = [t.name for t in _pick(node.inputs, rule.inputs) + _pick(node.outputs, rule.outputs)]
            members = [m for m in members if m in encodings and encodings[m].dtype == "int"]
            if len(members) > 1:
                links.append(members)
        groups = [g for g in _components(links) if len(g) > 1]
        for members in groups:
            group_links = [link for link in links if link[0] in members]
            for name, target in self._group_encodings(members, group_links, encodings, fixed, ctx).items():
                if encodings[name] != target:
                    encodings[name] = target
                    changed.add(name)

        grouped = {name for members in groups for name in members}
        decided = set(grouped)  # tensors whose encoding a rule chose, even when it kept the calibrated one
        fused = 0
        if self.options.fuse_activations:
            for node in module.graph.nodes:
                if node.op not in FUSED_ACTIVATIONS or not node.inputs or not node.outputs:
                    continue
                source, result = node.inputs[0], node.outputs[0]
                producer = source.inputs[0] if source.inputs else None
                if producer is None or producer.op not in FUSIBLE_PRODUCERS:
                    continue
                if not has_single_consumer(module.graph, source) or source.name not in encodings or result.name not in encodings:
                    continue
                if source.name in fixed:
                    ctx.remark(producer, f"output '{source.name}' has a fixed range; not fused with {node.op}")
                    continue
                wanted = encodings[result.name]
                if wanted.bw != encodings[source.name].bw:
                    wanted = activation_encoding(float(wanted.min[0]), float(wanted.max[0]), encodings[source.name].bw)
                decided.add(source.name)
                if encodings[source.name] != wanted:
                    encodings[source.name] = wanted
                    changed.add(source.name)
                    fused += 1
        clamped = 0
        for node in module.graph.nodes:
            source = node.inputs[0] if node.inputs else None
            if source is None or source.name not in encodings or source.name in fixed or source.name in grouped:
                continue
            out_enc = encodings.get(node.outputs[0].name) if node.outputs else None
            bounds = saturation_bounds(node, out_enc.bw if out_enc is not None else encodings[source.name].bw)
            if bounds is None or not has_single_consumer(module.graph, source):
                continue
            decided.add(source.name)
            enc = encodings[source.name]
            lo, hi, step = float(enc.min[0]), float(enc.max[0]), enc.scale[0]
            # A step of slack: the grid (zero kept exact) may put an end up to half a step past the bound.
            if lo < bounds[0] - step or hi > bounds[1] + step:
                encodings[source.name] = activation_encoding(max(lo, bounds[0]), min(hi, bounds[1]), enc.bw)
                changed.add(source.name)
                clamped += 1
        mapped = 0
        for node in module.graph.toposort().nodes:  # in order: a chain (Mul then Add) maps the mapped grid
            affine = scalar_affine(node)
            if affine is None:
                continue
            source, a, b = affine
            result = node.outputs[0].name
            if result in decided or result in fixed or source.name not in encodings or result not in encodings:
                continue
            enc, own = encodings[source.name], encodings[result]
            if enc.dtype != "int" or own.dtype != "int" or enc.per_channel or enc.bw != own.bw:
                continue
            target = mapped_encoding(enc, a, b)
            if target is not None and target != own:
                encodings[result] = target
                changed.add(result)
                mapped += 1
        return PassResult(bool(changed), {"groups": len(groups), "shared": len(changed) - fused - clamped - mapped,
                                          "fused": fused, "saturation-clamped": clamped, "affine-mapped": mapped})

    @staticmethod
    def _group_encodings(members: list[str], links: list[list[str]], encodings: dict, fixed: dict,
                         ctx: PassContext) -> dict:
        """Member -> its encoding: the union of the group's ranges, or a fixed range that covers them.

        When members exceed a fixed range (Concat of a Sigmoid and a Conv output), the fixed-range
        tensors keep their encodings and the links through them are cut; each remaining part takes
        the fixed range it touches if it fits in it (Sigmoid -> Reshape), else its own union."""
        bw = max(encodings[m].bw for m in members)
        pinned = [m for m in members if m in fixed]

        def fits(part: list[str], lo: float, hi: float) -> bool:
            return all(fixed[m] == (lo, hi) if m in fixed else
                       float(encodings[m].min[0]) >= lo - encodings[m].scale[0] and
                       float(encodings[m].max[0]) <= hi + encodings[m].scale[0] for m in part)

        if not pinned:
            return {m: PropagateEncodings._union(members, encodings, bw) for m in members}
        if fits(members, *fixed[pinned[0]]):
            return {m: range_encoding(*fixed[pinned[0]], bw) for m in members}
        ctx.remark(pinned[0], f"fixed range {fixed[pinned[0]]} does not cover its shared-encoding group; "
                              f"fixed-range tensors keep their own encodings")
        result = {m: encodings[m] for m in pinned}
        free = [[m for m in link if m not in fixed] for link in links]
        parts = _components([link for link in free if link] + [[m] for m in members if m not in fixed])
        for part in parts:
            touching = {fixed[p] for link in links if set(link) & set(part) for p in link if p in fixed}
            if len(touching) == 1 and fits(part, *next(iter(touching))):
                result.update({m: range_encoding(*next(iter(touching)), bw) for m in part})
            elif len(part) > 1:
                result.update({m: PropagateEncodings._union(part, encodings, bw) for m in part})
        return result

    @staticmethod
    def _union(members: list[str], encodings: dict, bw: int):
        current = [encodings[m] for m in members]
        if all(e == current[0] for e in current):
            return current[0]  # already shared: keep it exactly (re-deriving could move a float ulp)
        return union_encoding(current, bw)


def scalar_affine(node) -> tuple | None:
    """(x, a, b) when ``node`` computes y = a*x + b from one tensor x and a finite scalar constant, a != 0:
    fold-affine's constant operands (Mul, Add, x - c, x / c), c - x and Neg."""
    if node.op == "Neg":
        source, a, b = node.inputs[0], -1.0, 0.0
    else:
        operand = constant_operand(node)
        mirrored = operand is None and node.op == "Sub" and const_value(node.inputs[1]) is None
        if mirrored:  # c - x = -x + c
            operand = node.inputs[1], const_value(node.inputs[0]), "Add"
        if operand is None or operand[1] is None:
            return None
        source, value, kind = operand
        if value.size != 1 or not np.isfinite(value).all():
            return None
        value = float(value.ravel()[0])
        a, b = (value, 0.0) if kind == "Mul" else (1.0, value)
        a = -a if mirrored else a
    return (source, a, b) if a != 0 and is_float(source) else None


def mapped_encoding(enc: Encoding, a: float, b: float) -> Encoding | None:
    """The encoding of a*x + b whose codes are x's (mirrored when a < 0), b rounded to the grid; None
    when that grid would not hold zero."""
    levels = 2 ** enc.bw - 1
    scale = float(np.float32(enc.scale[0] * abs(a)))
    offset = enc.offset[0] if a > 0 else -levels - enc.offset[0]
    offset += int(np.round(b / scale))
    if not -levels <= offset <= 0:
        return None
    return Encoding(bw=enc.bw, scale=(scale,), offset=(offset,))


def quantized_simulation(module: Module, weight_bits: int, per_channel: bool) -> tuple[Module, Module]:
    """What the end of a quantized pipeline would make of ``module`` now: a clone with propagate-encodings'
    encodings, and the QDQ model insert-qdq writes from it (bias-correction's and brecq's simulation)."""
    propagated = module.clone()
    PropagateEncodings().run(propagated, PassContext(log=lambda message: None))
    return propagated, qdq_simulation(propagated, weight_bits, per_channel)
