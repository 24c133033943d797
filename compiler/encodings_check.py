"""Check an encodings file against the QDQ model it is meant to describe (``qcc encodings check``).

The rules, one problem line each:

- coverage: every tensor Qualcomm's tools quantize in the model (compiler.export.tool_encodings: activations,
  the constants insert-qdq stored quantized, Clip bounds) has an encoding in the file (QNN's converter fills a
  gap with its own defaults);
- names: every name in the file is a tensor of the model, and none is one those tools keep no quantizer for
  (a producer's output fused with its activation, a data-movement op's output; AIMET refuses such a name);
- agreement: each encoding has the model's bit-width, symmetry, scales (relative 1e-6) and offsets;
- bias: an int32 bias has scale s_in * s_w (relative 1e-5), per channel, as QNN's HTP reads it;
- generation: no weight is wider than the HTP generation takes (compiler.encoding.HTP_ARCHS).
"""
from __future__ import annotations

import json

import numpy as np
import onnx_graphsurgeon as gs

from compiler.encoding import HTP_ARCHS, Encoding
from compiler.export import left_out_activations, qdq_encodings, tool_encodings
from compiler.ir import Module
from compiler.qdq import BIAS_OPS, QDQ_CONSTANTS_KEY, WEIGHT_OPS

SCALE_RTOL = 1e-6
BIAS_RTOL = 1e-5


def check_encodings(module: Module, activations: dict, params: dict, htp_arch: str | None = None) -> list[str]:
    """The problems of the file's ``activations`` and ``params`` (compiler.export.read_encodings) as a
    description of the QDQ ``module``; empty when it describes it. Which section of the file holds a name
    does not matter (2.0.0 has none); what the name is in the model does."""
    model_activations, model_params = tool_encodings(module)
    expected = {**model_activations, **model_params}
    given = {**activations, **params}
    kind = {**{n: "activation" for n in model_activations}, **{n: "parameter" for n in model_params}}
    quantized = qdq_encodings(module)[0]
    left_out = left_out_activations(module, quantized)
    tensors = set(module.graph.tensors()) | set(json.loads(module.metadata.get(QDQ_CONSTANTS_KEY, "{}")))
    problems = [f"{kind[name]} '{name}' is quantized in the model but has no encoding" for name in sorted(set(expected) - set(given))]
    problems += [f"'{name}' names no tensor of the model" for name in sorted(set(given) - tensors)]
    problems += [f"'{name}' is {left_out[name]}: Qualcomm's tools have no quantizer for it" for name in sorted(set(given) & set(left_out))]
    problems += [f"{kind[name]} '{name}': {why}" for name in sorted(set(given) & set(expected))
                 for why in [_disagreement(given[name], expected[name])] if why]
    # A layer whose input the file leaves out reads the encoding that stands for it, which agreement checked.
    problems += _bias_problems(module, {**{name: quantized[name] for name in left_out}, **given})
    arch = HTP_ARCHS.get(htp_arch) if htp_arch else None
    if arch is not None:
        problems += [f"parameter '{name}': {problem}" for name, enc in sorted(given.items())
                     for problem in [arch.weight_problem(enc.bw) if enc.symmetric and enc.bw < 32 else ""] if problem]
    return problems


def _disagreement(given: Encoding, expected: Encoding) -> str:
    if given.dtype != expected.dtype or given.bw != expected.bw:
        return f"{given.bw}-bit {given.dtype} in the file, {expected.bw}-bit {expected.dtype} in the model"
    if given.dtype != "int":
        return ""
    if given.symmetric != expected.symmetric:
        return f"is_sym {given.symmetric} in the file, {expected.symmetric} in the model"
    if len(given.scale) != len(expected.scale):
        return f"{len(given.scale)} scale(s) in the file, {len(expected.scale)} in the model"
    if not np.allclose(given.scale, expected.scale, rtol=SCALE_RTOL, atol=0):
        return f"scale {_first_different(given.scale, expected.scale)}"
    if tuple(given.offset) != tuple(expected.offset):
        return f"offset {_first_different(given.offset, expected.offset)}"
    return ""


def _first_different(given, expected) -> str:
    index = next(i for i, (a, b) in enumerate(zip(given, expected)) if a != b)
    where = f" (channel {index})" if len(given) > 1 else ""
    return f"{given[index]} in the file, {expected[index]} in the model{where}"


def _bias_problems(module: Module, given: dict) -> list[str]:
    """An int32 bias whose scales are not its layer's input scale times its weight scales."""
    stored = {v: k for k, v in json.loads(module.metadata.get(QDQ_CONSTANTS_KEY, "{}")).items()}
    problems = []
    for node in module.graph.nodes:
        if node.op not in BIAS_OPS or node.op not in WEIGHT_OPS or len(node.inputs) < 3:
            continue
        names = [_quantized_name(tensor, stored) for tensor in node.inputs[:3]]
        if None in names or any(name not in given for name in names):
            continue
        source, weight, bias = (given[name] for name in names)
        wanted = np.float32(source.scale[0]) * np.asarray(weight.scale, dtype=np.float32)
        wanted = np.broadcast_to(wanted, np.shape(bias.scale))
        if bias.bw == 32 and not np.allclose(bias.scale, wanted, rtol=BIAS_RTOL, atol=0):
            problems.append(f"bias '{names[2]}' of node '{node.name or node.outputs[0].name}' ({node.op}): scale "
                            f"{_first_different(tuple(bias.scale), tuple(float(w) for w in wanted)).replace('in the model', 'as s_in * s_w')}")
    return problems


def _quantized_name(tensor, stored: dict) -> str | None:
    """The encoding name of what a DequantizeLinear feeding a node restores: a stored constant's original
    name, or the activation its QuantizeLinear reads."""
    dq = tensor.inputs[0] if tensor.inputs else None
    if dq is None or dq.op != "DequantizeLinear":
        return None
    source = dq.inputs[0]
    if isinstance(source, gs.Constant):
        return stored.get(source.name)
    quantize = source.inputs[0] if source.inputs else None
    return quantize.inputs[0].name if quantize is not None and quantize.op == "QuantizeLinear" else None
