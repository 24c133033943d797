"""Encoding propagation: the rules by which ops that move codes without computing (Relu after its
producer, MaxPool, Reshape, Concat, scalar affine ops, ...) take their input's encoding, so HTP never
requantizes there. propagate-encodings runs it on the compiled model; compiler.quantsim runs the same
code on a copy. passes/propagate_encodings.py states the rules.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from compiler.calibration import is_float
from compiler.encoding import (ALL, FUSED_ACTIVATIONS, FUSIBLE_PRODUCERS, SHARED_ENCODING_OPS, Encoding,
                               activation_encoding, fixed_ranges, on_symmetric_grid, range_encoding,
                               saturation_bounds, symmetric_grid_encoding, union_encoding)
from compiler.ir import Module, const_value
from compiler.patterns import constant_operand, has_single_consumer


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


def propagate_encodings(module: Module, fuse_activations: bool = True,
                        remark: Callable[[object, str], None] = lambda where, message: None) -> dict:
    """propagate-encodings' rules (passes/propagate_encodings.py states them) on ``module.encodings``, in
    place; returns the stats, with ``changed`` the number of encodings replaced."""
    return _Propagation(remark).run(module, fuse_activations)


class _Propagation:
    def __init__(self, remark: Callable[[object, str], None]):
        self.remark = remark

    def run(self, module: Module, fuse_activations: bool) -> dict:
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
            for name, target in self._group_encodings(members, group_links, encodings, fixed).items():
                if encodings[name] != target:
                    encodings[name] = target
                    changed.add(name)

        grouped = {name for members in groups for name in members}
        decided = set(grouped)  # tensors whose encoding a rule chose, even when it kept the calibrated one
        fused = 0
        if fuse_activations:
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
                    self.remark(producer, f"output '{source.name}' has a fixed range; not fused with {node.op}")
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
        symmetric = 0
        for name in dynamic_matmul_second_inputs(module, groups):
            enc = encodings.get(name)
            if enc is None or enc.dtype != "int" or enc.per_channel or on_symmetric_grid(enc):
                continue
            encodings[name] = symmetric_grid_encoding(float(enc.min[0]), float(enc.max[0]), enc.bw)
            decided.add(name)
            changed.add(name)
            symmetric += 1
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
        return {"changed": len(changed), "groups": len(groups),
                "shared": len(changed) - fused - clamped - symmetric - mapped, "fused": fused,
                "saturation-clamped": clamped, "matmul-symmetric": symmetric, "affine-mapped": mapped}

    def _group_encodings(self, members: list[str], links: list[list[str]], encodings: dict, fixed: dict) -> dict:
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
            return {m: _union(members, encodings, bw) for m in members}
        if fits(members, *fixed[pinned[0]]):
            return {m: range_encoding(*fixed[pinned[0]], bw) for m in members}
        self.remark(pinned[0], f"fixed range {fixed[pinned[0]]} does not cover its shared-encoding group; "
                              f"fixed-range tensors keep their own encodings")
        result = {m: encodings[m] for m in pinned}
        free = [[m for m in link if m not in fixed] for link in links]
        parts = _components([link for link in free if link] + [[m] for m in members if m not in fixed])
        for part in parts:
            touching = {fixed[p] for link in links if set(link) & set(part) for p in link if p in fixed}
            if len(touching) == 1 and fits(part, *next(iter(touching))):
                result.update({m: range_encoding(*next(iter(touching)), bw) for m in part})
            elif len(part) > 1:
                result.update({m: _union(part, encodings, bw) for m in part})
        return result


def dynamic_matmul_second_inputs(module: Module, groups: list) -> list[str]:
    """The tensors whose encoding a MatMul of two activations reads as its second input: that input and the
    members of its shared-encoding group."""
    names = []
    for node in module.graph.nodes:
        if node.op != "MatMul" or len(node.inputs) < 2 or const_value(node.inputs[1]) is not None:
            continue
        second = node.inputs[1].name
        members = next((members for members in groups if second in members), [second])
        names += [name for name in members if name not in names]
    return names


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
