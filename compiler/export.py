"""Encodings files for Qualcomm's tools (qnn-onnx-converter --quantization_overrides, AIMET).

Written from the QDQ model itself, so the file describes exactly what the model quantizes and its
numbers are those of the QuantizeLinear/DequantizeLinear nodes: activations are the inputs of the
Q nodes (a graph output is named by its DQ, which keeps the output's name), parameters the
constants insert-qdq stored quantized (model metadata ``qcc.qdq-constants``; a constant the input model
already stored quantized is named by its DQ's output). Offsets follow
QNN/AIMET: x = (q + offset) * scale, so offset = -zero_point for unsigned storage.

1.0.0 (default, AIMET 2 ``sim.export``)::

    {"version": "1.0.0",
     "activation_encodings": [{"name", "dtype": "INT", "enc_type": "PER_TENSOR", "is_sym": false,
                               "bw": 8, "scale": [s], "offset": [o]}, ...],
     "param_encodings": [... "enc_type": "PER_CHANNEL", "scale": [one per channel], ...],
     "excluded_layers": [], "quantizer_args": {...}}

0.6.1 (legacy)::

    {"version": "0.6.1",
     "activation_encodings": {name: [{"bitwidth", "dtype": "int", "is_symmetric": "False",
                                      "max", "min", "offset", "scale"}]},
     "param_encodings": {name: [one entry per channel]}, ...}

``read_encodings`` parses either layout back into Encodings; ``apply_encodings`` puts them on a
float module (per-channel axes from the consuming op, bit-widths pinned with ``act_bits``), so that
insert-qdq reproduces the same QDQ model.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs

from compiler.encoding import Encoding, encoding_from_qdq
from compiler.ir import Module, QccError, const_value
from compiler.outputs import write_file

FORMATS = ("1.0.0", "0.6.1")


def qdq_encodings(module: Module) -> tuple[dict, dict]:
    """(activation encodings, parameter encodings) read from the QDQ nodes of ``module``."""
    graph = module.graph
    outputs = {t.name for t in graph.outputs}
    activations, params = {}, {}
    for node in graph.nodes:
        if node.op != "QuantizeLinear":
            continue
        dq = next((u for u in node.outputs[0].outputs if u.op == "DequantizeLinear"), None)
        name = dq.outputs[0].name if dq is not None and dq.outputs[0].name in outputs else node.inputs[0].name
        activations[name] = _node_encoding(module, node, name)
    stored = json.loads(module.metadata.get("qcc.qdq-constants", "{}"))
    by_stored = {v: k for k, v in stored.items()}
    for node in graph.nodes:
        if node.op == "DequantizeLinear" and isinstance(node.inputs[0], gs.Constant):
            # A constant quantized before qcc saw the model stands for the float tensor its DQ outputs.
            name = by_stored.get(node.inputs[0].name, node.outputs[0].name)
            params[name] = _node_encoding(module, node, name)
    return activations, params


def _node_encoding(module: Module, node: gs.Node, name: str) -> Encoding:
    scale, zero_point = const_value(node.inputs[1]), const_value(node.inputs[2])
    known = module.encodings.get(name)
    # The storage type gives the bit-width except for 4-bit weights stored as int8: the table knows.
    bw = known.bw if known is not None and known.bw < np.dtype(zero_point.dtype).itemsize * 8 else None
    return encoding_from_qdq(scale, zero_point, node.attrs.get("axis", 1) if np.ndim(scale) == 1 else None, bw)


def encodings_document(module: Module, fmt: str = "1.0.0") -> dict:
    if fmt not in FORMATS:
        raise QccError(f"unknown encodings format '{fmt}'; valid formats: {', '.join(FORMATS)}")
    activations, params = qdq_encodings(module)
    if not activations and not params:
        raise QccError("the model has no QuantizeLinear/DequantizeLinear nodes: nothing to export (run insert-qdq)")
    for name, enc in [*activations.items(), *params.items()]:
        problem = _scale_problem(enc)
        if problem:
            raise QccError(f"cannot export the encoding of '{name}': {problem}")
    entry = _entry_v1 if fmt == "1.0.0" else _entry_legacy
    if fmt == "1.0.0":
        body = {"activation_encodings": [entry(n, e) for n, e in sorted(activations.items())],
                "param_encodings": [entry(n, e) for n, e in sorted(params.items())]}
    else:
        body = {"activation_encodings": {n: entry(n, e) for n, e in sorted(activations.items())},
                "param_encodings": {n: entry(n, e) for n, e in sorted(params.items())}}
    weights = [e for e in params.values() if e.bw < 32]
    return {"version": fmt, **body, "excluded_layers": [],
            "quantizer_args": {"activation_bitwidth": max((e.bw for e in activations.values()), default=8),
                               "param_bitwidth": max((e.bw for e in weights), default=8),
                               "dtype": "int", "is_symmetric": True, "quant_scheme": "post_training_tf",
                               "per_channel_quantization": any(e.per_channel for e in weights)}}


def _entry_v1(name: str, enc: Encoding) -> dict:
    return {"name": name, "dtype": "INT", "enc_type": "PER_CHANNEL" if enc.per_channel else "PER_TENSOR",
            "is_sym": enc.symmetric, "bw": enc.bw, "scale": list(enc.scale), "offset": list(enc.offset)}


def _entry_legacy(name: str, enc: Encoding) -> list:
    return [{"bitwidth": enc.bw, "dtype": "int", "is_symmetric": str(enc.symmetric),
             "max": float(hi), "min": float(lo), "offset": int(offset), "scale": float(scale)}
            for lo, hi, offset, scale in zip(enc.min, enc.max, enc.offset, enc.scale)]


def encodings_json(module: Module, fmt: str = "1.0.0") -> str:
    return json.dumps(encodings_document(module, fmt), indent=1, allow_nan=False) + "\n"


def write_encodings(module: Module, path: str | Path, fmt: str = "1.0.0") -> None:
    write_file(Path(path), encodings_json(module, fmt))


def _scale_problem(enc: Encoding) -> str:
    """Why ``enc``'s scales are not a quantization grid ('' if they are): NaN, Inf or not positive."""
    bad = [s for s in enc.scale if not (math.isfinite(s) and s > 0)]
    return f"scale {bad[0]} (scales must be finite and positive)" if bad else ""


# --- reading ------------------------------------------------------------------------------------

def read_encodings(path: str | Path) -> tuple[dict, dict]:
    """(activation encodings, parameter encodings) from a 1.0.0 or 0.6.1 file. Per-channel
    encodings carry axis 0 here; ``apply_encodings`` sets the consuming op's axis."""
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise QccError(f"{path}: cannot read encodings ({type(exc).__name__}: {exc})") from None
    try:
        sections = (_parse_section(document.get("activation_encodings", {})),
                    _parse_section(document.get("param_encodings", {})))
    except (KeyError, TypeError, ValueError) as exc:
        raise QccError(f"{path}: malformed encodings ({type(exc).__name__}: {exc})") from None
    for name, enc in [item for section in sections for item in section.items()]:
        problem = _scale_problem(enc)
        if problem:
            raise QccError(f"{path}: the encoding of '{name}' has {problem}")
    return sections


def _parse_section(section) -> dict:
    if isinstance(section, list):  # 1.0.0
        result = {}
        for item in section:
            if str(item.get("dtype", "INT")).upper() == "FLOAT":
                result[item["name"]] = Encoding(bw=int(item.get("bw", 16)), scale=(), offset=(), dtype="float")
                continue
            per_channel = item.get("enc_type", "PER_TENSOR") == "PER_CHANNEL"
            result[item["name"]] = Encoding(bw=int(item["bw"]), scale=tuple(float(s) for s in item["scale"]),
                                            offset=tuple(int(o) for o in item["offset"]), symmetric=bool(item["is_sym"]),
                                            axis=0 if per_channel else None)
        return result
    result = {}
    for name, channels in section.items():  # 0.6.1: one dict per channel
        if str(channels[0].get("dtype", "int")).lower() == "float":
            result[name] = Encoding(bw=int(channels[0]["bitwidth"]), scale=(), offset=(), dtype="float")
            continue
        result[name] = Encoding(bw=int(channels[0]["bitwidth"]), scale=tuple(float(c["scale"]) for c in channels),
                                offset=tuple(int(c["offset"]) for c in channels),
                                symmetric=str(channels[0]["is_symmetric"]).lower() == "true",
                                axis=0 if len(channels) > 1 else None)
    return result


def apply_encodings(module: Module, activations: dict, params: dict) -> dict:
    """Put loaded encodings on a float ``module`` for insert-qdq; returns counts. Activation
    bit-widths are pinned with ``act_bits``; a per-channel parameter takes the axis its consuming
    op uses; names the module lacks are skipped (insert-qdq recreates derived tensors itself)."""
    from compiler.qdq import weight_axis
    tensors = module.graph.tensors()
    applied = {"activations": 0, "params": 0, "skipped": 0}
    for name, enc in activations.items():
        if name not in tensors:
            applied["skipped"] += 1
            continue
        module.encodings[name] = enc
        module.annotate(name, act_bits=enc.bw)
        applied["activations"] += 1
    axes = {}
    for node in module.graph.nodes:
        for index, tensor in enumerate(node.inputs):
            value = const_value(tensor)
            if value is None:
                continue
            if index == 1:
                axes.setdefault(tensor.name, weight_axis(node, value))
            elif index == 2 and value.ndim:
                axes.setdefault(tensor.name, value.ndim - 1)
    for name, enc in params.items():
        if name not in tensors:
            applied["skipped"] += 1
            continue
        if enc.bw == 32:  # a bias: insert-qdq derives it from its input's and weight's scales
            continue
        if enc.per_channel:
            enc = Encoding(bw=enc.bw, scale=enc.scale, offset=enc.offset, symmetric=enc.symmetric, axis=axes.get(name, 0))
        module.encodings[name] = enc
        applied["params"] += 1
    return applied
