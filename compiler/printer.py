"""Deterministic text dump of a Module, used by golden files and `qcc print`.

Nodes in topological order, one per line (``%y = Conv(%x, @w) {group=1}``);
initializers as dtype and shape, then their values when they have at most ``BY_VALUE`` elements (a
bias, a scale, a 1x1 kernel: a golden diff then shows how a pass changed them) or else a short digest;
encodings and annotations last.
Node names are not printed: they carry no meaning and exporters invent them.
"""
from __future__ import annotations

import hashlib

import numpy as np
import onnx_graphsurgeon as gs

from compiler.ir import Module

BY_VALUE = 16


def digest(values: np.ndarray) -> str:
    array = np.ascontiguousarray(values)
    return hashlib.sha256(str(array.dtype).encode() + str(array.shape).encode() + array.tobytes()).hexdigest()[:8]


def _contents(values: np.ndarray) -> str:
    """``= [v, ...]`` (values in %.6g) for a small array, else its digest."""
    array = np.asarray(values)
    if array.size > BY_VALUE or array.dtype.kind not in "biuf":
        return digest(array)
    items = (f"{v:.6g}" if array.dtype.kind == "f" else str(v) for v in array.ravel().tolist())
    return "= [" + ", ".join(items) + "]"


def _type(tensor) -> str:
    dtype = np.dtype(tensor.dtype).name if tensor.dtype is not None else "?"
    if tensor.shape is None:
        return f"{dtype}[?]"
    return f"{dtype}[{','.join(str(d) for d in tensor.shape)}]"


def _ref(tensor) -> str:
    if not tensor.name:
        return "%<none>"
    return f"@{tensor.name}" if isinstance(tensor, gs.Constant) else f"%{tensor.name}"


def _value(value) -> str:
    if isinstance(value, gs.Constant):
        return f"tensor<{_type(value)} {_contents(value.values)}>"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_value(v) for v in value) + "]"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, np.ndarray):
        return f"tensor<{value.dtype}{list(value.shape)} {_contents(value)}>"
    return str(value)


def print_module(module: Module) -> str:
    graph = module.graph
    graph.cleanup().toposort()
    lines = [f"module opset={module.opset}"]
    for tensor in graph.inputs:
        lines.append(f"input %{tensor.name}: {_type(tensor)}")
    constants = {}
    for node in graph.nodes:
        for tensor in node.inputs:
            if isinstance(tensor, gs.Constant):
                constants[tensor.name] = tensor
    for name in sorted(constants):
        lines.append(f"const @{name}: {_type(constants[name])} {_contents(constants[name].values)}")
    for node in graph.nodes:
        attrs = ", ".join(f"{k}={_value(v)}" for k, v in sorted(node.attrs.items()))
        domain = f"{node.domain}." if node.domain else ""
        outs = ", ".join(_ref(t) for t in node.outputs)
        ins = ", ".join(_ref(t) for t in node.inputs)
        lines.append(f"{outs} = {domain}{node.op}({ins})" + (f" {{{attrs}}}" if attrs else ""))
    for tensor in graph.outputs:
        lines.append(f"output %{tensor.name}: {_type(tensor)}")
    for name in sorted(module.encodings):
        lines.append(f"encoding %{name}: {module.encodings[name]}")
    for name in sorted(module.annotations):
        hints = ", ".join(f"{k}={_value(v)}" for k, v in sorted(module.annotations[name].items()))
        lines.append(f"annotation %{name}: {hints}")
    return "\n".join(lines) + "\n"
