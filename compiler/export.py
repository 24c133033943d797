"""Encodings files for Qualcomm's tools (qnn-onnx-converter --quantization_overrides, AIMET).

Written from the QDQ model itself, so the numbers are those of the QuantizeLinear/DequantizeLinear nodes:
activations are the inputs of the Q nodes (a graph output is named by its DQ, which keeps the output's
name), parameters the constants insert-qdq stored quantized (model metadata ``qcc.qdq-constants``; a
constant the input model already stored quantized is named by its DQ's output). Offsets follow QNN/AIMET:
x = (q + offset) * scale, so offset = -zero_point for unsigned storage.

The file describes OUT.float.onnx (the model insert-qdq quantized) for the graph Qualcomm's tools see
(docs/encodings.md). One rule: where two adjacent tensors carry the same encoding and those tools keep
one quantizer for both, the file names the one they keep; applying it quantizes the other on the same
grid, which is what the QDQ model does (quantizing twice on one grid is quantizing once):

- the output of a producer fused with its activation (``FUSED_PAIRS``: Conv + Relu, Gemm + Relu, ...;
  the converter's and AIMET's HTP supergroups; not a depthwise Conv) is left out: it does not exist for them;
- the output of a data-movement op (``OUTPUT_IS_INPUT_OPS``: Reshape, Flatten, Transpose, MaxPool, ...)
  is left out when it has its input's encoding: they quantize the input only.

Constants they quantize that the QDQ model keeps float get an encoding that holds their value exactly:
Clip's min and max (AIMET quantizes them at the activation width), over [min(0, v), max(0, v)].

The activation a MatMul of two activations reads as its second input (directly or through data-movement
ops) is written symmetric (``is_sym``, offset -2^(bw-1)): AIMET quantizes it so, and HTP's MatMul requires it
at 16 bits. propagate-encodings put it on that grid; the QDQ model stores it unsigned with zero point
2^(bw-1) (HTP v73 refuses signed activations there: docs/htp-backend.md), the same codes, and a file read
back (``apply_encodings``) is stored the same way.

1.0.0 (default, AIMET 2 ``sim.export``)::

    {"version": "1.0.0",
     "activation_encodings": [{"name", "dtype": "INT", "enc_type": "PER_TENSOR", "is_sym": false,
                               "bw": 8, "scale": [s], "offset": [o]}, ...],
     "param_encodings": [... "enc_type": "PER_CHANNEL", "scale": [one per channel], ...],
     "excluded_layers": [], "quantizer_args": {...}}

2.0.0 (QuantizeLinear's own terms; the only layout that states a per-channel axis)::

    {"version": "2.0.0",
     "encodings": [{"name", "output_dtype": "uint8", "y_scale": s, "y_zero_point": z},
                   {"name", "output_dtype": "int8", "y_scale": [one per channel], "axis": 0}, ...]}

   A symmetric encoding is a signed ``output_dtype`` with no ``y_zero_point`` (zero). There is no
   activation/parameter split: ``read_encodings`` returns signed entries as parameters and unsigned
   ones as activations, and its consumers (``apply_encodings``, compiler.encodings_check) go by the model.

0.6.1 (legacy)::

    {"version": "0.6.1",
     "activation_encodings": {name: [{"bitwidth", "dtype": "int", "is_symmetric": "False",
                                      "max", "min", "offset", "scale"}]},
     "param_encodings": {name: [one entry per channel]}, ...}

``read_encodings`` parses any of the three back into Encodings; ``apply_encodings`` puts them on the
float module (per-channel axes from the consuming op, bit-widths pinned with ``act_bits``, the tensors
the file leaves out by the rule above restored), so that insert-qdq reproduces the same QDQ model.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from compiler.encoding import Encoding, activation_encoding, encoding_from_qdq, on_symmetric_grid
from compiler.ir import Module, QccError, const_value
from compiler.outputs import write_file

FORMATS = ("1.0.0", "2.0.0", "0.6.1")

# Ops whose output Qualcomm's tools do not quantize: it is the input re-read (aimet_onnx's
# op_outputs_to_ignore; MaxPool, whose output AIMET ties to its input's quantizer; Slice, whose output
# quantizer AIMET 2.42's HTP v73 sim leaves disabled: rec's attention heads).
OUTPUT_IS_INPUT_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity", "Gather",
                                 "Tile", "Split", "MaxPool", "Slice"})
# Producer + activation pairs QNN's converter and AIMET's HTP config (its supergroups) run as one op.
FUSED_PAIRS = frozenset({("Conv", "Relu"), ("Conv", "Clip"), ("ConvTranspose", "Relu"), ("Gemm", "Relu"),
                         ("Add", "Relu")})
CLIP_BOUNDS = (1, 2)


def qdq_encodings(module: Module) -> tuple[dict, dict]:
    """(activation encodings, parameter encodings) read from the QDQ nodes of ``module``: every tensor it quantizes."""
    graph = module.graph
    outputs = {t.name for t in graph.outputs}
    activations, params = {}, {}
    for node in graph.nodes:
        if node.op == "QuantizeLinear":
            name = _activation_name(node, outputs)
            activations[name] = _node_encoding(module, node, name)
    stored = json.loads(module.metadata.get("qcc.qdq-constants", "{}"))
    by_stored = {v: k for k, v in stored.items()}
    for node in graph.nodes:
        if node.op == "DequantizeLinear" and isinstance(node.inputs[0], gs.Constant):
            # A constant quantized before qcc saw the model stands for the float tensor its DQ outputs.
            name = by_stored.get(node.inputs[0].name, node.outputs[0].name)
            params[name] = _node_encoding(module, node, name)
    return activations, params


def biases_as_stored(float_model, module: Module) -> None:
    """Set each bias the QDQ ``module`` stores as int32 to the float32 value its DequantizeLinear gives, in
    ``float_model`` (the ModelProto written as OUT.float.onnx), in place.

    Why: AIMET's HTP configs leave bias quantizers disabled, so its simulation on OUT.float.onnx adds the float
    bias where OUT.onnx adds q * s_in * s_w: half an int32 step at most, but s_in * s_w reaches 0.005 on det.
    That moved det's first Conv a step on 139 of 1.2M values and, carried through 60 layers, put AIMET's
    simulation at cosine 0.991-0.9988 to OUT.onnx (docs/encodings.md). A value on the int32 grid quantizes to
    itself, so a consumer that quantizes the bias gets the same integers."""
    stored = json.loads(module.metadata.get("qcc.qdq-constants", "{}"))
    by_stored = {v: k for k, v in stored.items()}
    initializers = {t.name: t for t in float_model.graph.initializer}
    for node in module.graph.nodes:
        if node.op != "DequantizeLinear" or not isinstance(node.inputs[0], gs.Constant):
            continue
        codes = const_value(node.inputs[0])
        target = initializers.get(by_stored.get(node.inputs[0].name))
        if codes.dtype != np.int32 or target is None:
            continue
        scale = np.asarray(const_value(node.inputs[1]), dtype=np.float32)
        if scale.ndim == 1 and codes.ndim > 1:
            shape = [1] * codes.ndim
            shape[node.attrs.get("axis", 1)] = -1
            scale = scale.reshape(shape)
        target.CopyFrom(numpy_helper.from_array((codes.astype(np.float32) * scale).astype(np.float32), target.name))


def tool_encodings(module: Module) -> tuple[dict, dict]:
    """(activation encodings, parameter encodings) of the QDQ ``module`` for the graph Qualcomm's tools see:
    ``qdq_encodings`` less the tensors they keep no quantizer for, plus the Clip bounds they quantize, and
    symmetric where they quantize symmetric (the rules in this module's docstring)."""
    activations, params = qdq_encodings(module)
    left_out = set(left_out_activations(module, activations))
    params = {**params, **_clip_bound_encodings(module, activations)}
    symmetric = _second_matmul_inputs(module)
    return {n: _as_symmetric(e) if n in symmetric and on_symmetric_grid(e) else e
            for n, e in activations.items() if n not in left_out}, params


def _as_symmetric(enc: Encoding) -> Encoding:
    """The same grid as a symmetric encoding (offset -2^(bw-1) in both conventions)."""
    return Encoding(bw=enc.bw, scale=enc.scale, offset=enc.offset, symmetric=True)


def _second_matmul_inputs(module: Module) -> set:
    """Encoding names of the activations a MatMul of two activations reads as its second input, directly or
    through data-movement ops (OUTPUT_IS_INPUT_OPS): AIMET quantizes that input symmetric, and HTP's MatMul
    requires it at 16 bits (propagate-encodings puts them on the symmetric grid)."""
    outputs = {t.name for t in module.graph.outputs}
    names = set()
    for node in module.graph.nodes:
        tensor = node.inputs[1] if node.op == "MatMul" and len(node.inputs) > 1 else None
        while tensor is not None:
            quantize = _quantize_restored_by(tensor)
            if quantize is None:
                break
            names.add(_activation_name(quantize, outputs))
            producer = quantize.inputs[0].inputs[0] if quantize.inputs[0].inputs else None
            tensor = producer.inputs[0] if producer is not None and producer.op in OUTPUT_IS_INPUT_OPS else None
    return names


def left_out_activations(module: Module, activations: dict) -> dict:
    """{name: why} for the activations of the QDQ ``module`` that Qualcomm's tools keep no quantizer for: a
    producer's output fused with its activation, or a data-movement op's output with its input's encoding."""
    outputs = {t.name for t in module.graph.outputs}
    left_out = {}
    for node in module.graph.nodes:
        if node.op in OUTPUT_IS_INPUT_OPS and node.inputs:
            source = _restored_name(node.inputs[0], outputs)
            for tensor in node.outputs:
                name = _quantized_output_name(tensor, outputs)
                if source in activations and name in activations and activations[name] == activations[source]:
                    left_out[name] = f"the output of {node.op}, which Qualcomm's tools quantize as its input '{source}'"
        quantize = _sole_quantize_before(node)
        producer = quantize.inputs[0].inputs[0] if quantize is not None and quantize.inputs[0].inputs else None
        if producer is None or not _fused(producer, node):
            continue
        name, after = quantize.inputs[0].name, _quantized_output_name(node.outputs[0], outputs)
        if name in activations and after in activations and activations[name] == activations[after]:
            left_out[name] = f"the output of {producer.op}, which Qualcomm's tools fuse with the {node.op} after it"
    return left_out


def _clip_bound_encodings(module: Module, activations: dict) -> dict:
    """Encodings holding the float min/max constants of each Clip whose input is quantized, exactly."""
    outputs = {t.name for t in module.graph.outputs}
    params = {}
    for node in module.graph.nodes:
        source = _restored_name(node.inputs[0], outputs) if node.op == "Clip" and node.inputs else None
        if source not in activations:
            continue
        for index in CLIP_BOUNDS:
            value = const_value(node.inputs[index]) if len(node.inputs) > index and node.inputs[index].name else None
            if value is not None and value.size == 1 and np.issubdtype(value.dtype, np.floating):
                bound = float(value.reshape(()))
                params[node.inputs[index].name] = activation_encoding(bound, bound, activations[source].bw)
    return params


def _fused(producer: gs.Node, activation: gs.Node) -> bool:
    """Qualcomm's tools run ``producer`` and ``activation`` as one op. AIMET's HTP supergroups leave a
    depthwise Conv (one input channel per group) out of Conv + Relu (measured with aimet-onnx 2.42)."""
    if (producer.op, activation.op) not in FUSED_PAIRS:
        return False
    weight_shape = producer.inputs[1].shape if producer.op == "Conv" and len(producer.inputs) > 1 else None
    return not (producer.attrs.get("group", 1) > 1 and weight_shape is not None and weight_shape[1] == 1)


def _sole_quantize_before(node: gs.Node) -> gs.Node | None:
    """The QuantizeLinear whose Q/DQ pair feeds ``node``'s first input, when only ``node`` reads that pair and
    only the pair reads the quantized tensor."""
    restored = node.inputs[0] if node.inputs else None
    dq = restored.inputs[0] if restored is not None and restored.inputs else None
    if dq is None or dq.op != "DequantizeLinear" or len(restored.outputs) != 1 or not dq.inputs[0].inputs:
        return None
    quantize = dq.inputs[0].inputs[0]
    return quantize if quantize.op == "QuantizeLinear" and len(quantize.inputs[0].outputs) == 1 else None


def _activation_name(quantize: gs.Node, outputs: set) -> str:
    """The encoding name of what ``quantize`` quantizes: its input, or the graph output its DQ keeps the name of."""
    dq = next((u for u in quantize.outputs[0].outputs if u.op == "DequantizeLinear"), None)
    return dq.outputs[0].name if dq is not None and dq.outputs[0].name in outputs else quantize.inputs[0].name


def _quantize_restored_by(tensor) -> gs.Node | None:
    """The QuantizeLinear whose DequantizeLinear writes ``tensor`` (None if none does)."""
    dq = tensor.inputs[0] if tensor.inputs else None
    if dq is None or dq.op != "DequantizeLinear" or not dq.inputs[0].inputs:
        return None
    quantize = dq.inputs[0].inputs[0]
    return quantize if quantize.op == "QuantizeLinear" else None


def _restored_name(tensor, outputs: set) -> str | None:
    """The encoding name of the activation a DequantizeLinear output restores (None if ``tensor`` is none)."""
    quantize = _quantize_restored_by(tensor)
    return _activation_name(quantize, outputs) if quantize is not None else None


def _quantized_output_name(tensor, outputs: set) -> str | None:
    """The encoding name of a node's output if a QuantizeLinear reads it."""
    quantize = next((u for u in tensor.outputs if u.op == "QuantizeLinear"), None)
    return _activation_name(quantize, outputs) if quantize is not None else None


def _node_encoding(module: Module, node: gs.Node, name: str) -> Encoding:
    scale, zero_point = const_value(node.inputs[1]), const_value(node.inputs[2])
    known = module.encodings.get(name)
    # The storage type gives the bit-width except for 4-bit weights stored as int8: the table knows.
    bw = known.bw if known is not None and known.bw < np.dtype(zero_point.dtype).itemsize * 8 else None
    return encoding_from_qdq(scale, zero_point, node.attrs.get("axis", 1) if np.ndim(scale) == 1 else None, bw)


def encodings_document(module: Module, fmt: str = "1.0.0") -> dict:
    if fmt not in FORMATS:
        raise QccError(f"unknown encodings format '{fmt}'; valid formats: {', '.join(FORMATS)}")
    activations, params = tool_encodings(module)
    if not activations and not params:
        raise QccError("the model has no QuantizeLinear/DequantizeLinear nodes: nothing to export (run insert-qdq)")
    for name, enc in [*activations.items(), *params.items()]:
        problem = _scale_problem(enc)
        if problem:
            raise QccError(f"cannot export the encoding of '{name}': {problem}")
    if fmt == "2.0.0":
        merged = {**activations, **params}
        return {"version": fmt, "encodings": [_entry_v2(n, merged[n]) for n in sorted(merged)]}
    if fmt == "1.0.0":
        body = {"activation_encodings": [_entry_v1(n, e) for n, e in sorted(activations.items())],
                "param_encodings": [_entry_v1(n, e) for n, e in sorted(params.items())]}
    else:
        body = {"activation_encodings": {n: _entry_legacy(n, e) for n, e in sorted(activations.items())},
                "param_encodings": {n: _entry_legacy(n, e) for n, e in sorted(params.items())}}
    weights = [e for e in params.values() if e.bw < 32 and e.symmetric]
    return {"version": fmt, **body, "excluded_layers": [],
            "quantizer_args": {"activation_bitwidth": max((e.bw for e in activations.values()), default=8),
                               "param_bitwidth": max((e.bw for e in weights), default=8),
                               "dtype": "int", "is_symmetric": True, "quant_scheme": "post_training_tf",
                               "per_channel_quantization": any(e.per_channel for e in weights)}}


def _entry_v1(name: str, enc: Encoding) -> dict:
    return {"name": name, "dtype": "INT", "enc_type": "PER_CHANNEL" if enc.per_channel else "PER_TENSOR",
            "is_sym": enc.symmetric, "bw": enc.bw, "scale": list(enc.scale), "offset": list(enc.offset)}


def _entry_v2(name: str, enc: Encoding) -> dict:
    """QuantizeLinear's terms: x_q = round(x / y_scale) + y_zero_point in ``output_dtype``."""
    shift = 2 ** (enc.bw - 1) if enc.symmetric else 0
    zero_points = [-offset - shift for offset in enc.offset]
    entry = {"name": name, "output_dtype": f"{'int' if enc.symmetric else 'uint'}{enc.bw}",
             "y_scale": list(enc.scale) if enc.per_channel else enc.scale[0]}
    if any(zero_points):
        entry["y_zero_point"] = zero_points if enc.per_channel else zero_points[0]
    if enc.per_channel:
        entry["axis"] = enc.axis
    return entry


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
    """(activation encodings, parameter encodings) from a 1.0.0, 2.0.0 or 0.6.1 file. Per-channel
    encodings carry axis 0 here unless the file states it (2.0.0); ``apply_encodings`` sets the consuming
    op's axis. 2.0.0 has no activation/parameter split: signed entries come back as parameters."""
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise QccError(f"{path}: cannot read encodings ({type(exc).__name__}: {exc})") from None
    try:
        if document.get("version") == "2.0.0":
            sections = _parse_v2(document["encodings"])
        else:
            sections = (_parse_section(document.get("activation_encodings", {})),
                        _parse_section(document.get("param_encodings", {})))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise QccError(f"{path}: malformed encodings ({type(exc).__name__}: {exc})") from None
    for name, enc in [item for section in sections for item in section.items()]:
        problem = _scale_problem(enc)
        if problem:
            raise QccError(f"{path}: the encoding of '{name}' has {problem}")
    return sections


def _parse_v2(entries: list) -> tuple[dict, dict]:
    activations, params = {}, {}
    for item in entries:
        dtype = re.fullmatch(r"(u?)int(\d+)", str(item["output_dtype"]))
        if dtype is None:
            raise ValueError(f"'{item['name']}': output_dtype {item['output_dtype']!r} is not an integer type")
        signed, bw = not dtype.group(1), int(dtype.group(2))
        scales = np.atleast_1d(np.asarray(item["y_scale"], dtype=np.float64))
        zero_points = np.broadcast_to(np.atleast_1d(np.asarray(item.get("y_zero_point", 0), dtype=np.int64)), scales.shape)
        shift = 2 ** (bw - 1) if signed else 0
        per_channel = np.ndim(item["y_scale"]) == 1
        (params if signed else activations)[item["name"]] = Encoding(
            bw=bw, scale=tuple(float(s) for s in scales), offset=tuple(int(-z - shift) for z in zero_points),
            symmetric=signed, axis=int(item.get("axis", 0)) if per_channel else None)
    return activations, params


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
    """Put loaded encodings on a float ``module`` for insert-qdq; returns counts. What a name is (activation
    or constant) is the module's, whichever section of the file holds it. Activation bit-widths are pinned
    with ``act_bits``; a per-channel parameter takes the axis its consuming op uses; the tensors the file
    leaves out by this module's rule take the encoding of the tensor that stands for them; names the module
    lacks are skipped (insert-qdq recreates derived tensors itself)."""
    from compiler.qdq import weight_axis
    tensors = module.graph.tensors()
    applied = {"activations": 0, "params": 0, "skipped": 0}
    given = {**activations, **params}
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
    for name, enc in given.items():
        if name not in tensors:
            applied["skipped"] += 1
        elif const_value(tensors[name]) is not None:
            if enc.bw == 32:  # a bias: insert-qdq derives it from its input's and weight's scales
                continue
            if enc.per_channel:
                enc = Encoding(bw=enc.bw, scale=enc.scale, offset=enc.offset, symmetric=enc.symmetric,
                               axis=axes.get(name, 0))
            module.encodings[name] = enc
            applied["params"] += 1
        else:
            _set_activation(module, name, enc)
            applied["activations"] += 1
    applied["restored"] = _restore_left_out(module)
    return applied


def _set_activation(module: Module, name: str, enc: Encoding) -> None:
    if enc.symmetric and enc.dtype == "int":  # qcc stores activations unsigned: the same grid, zero point 2^(bw-1)
        enc = Encoding(bw=enc.bw, scale=enc.scale, offset=enc.offset)
    module.encodings[name] = enc
    module.annotate(name, act_bits=enc.bw)


def _restore_left_out(module: Module) -> int:
    """Give the tensors an encodings file leaves out the encoding of the tensor that stands for them."""
    encodings, restored = module.encodings, 0
    for node in module.graph.toposort().nodes:
        if node.op in OUTPUT_IS_INPUT_OPS and node.inputs and encodings.get(node.inputs[0].name) is not None:
            source = encodings[node.inputs[0].name]
            for tensor in node.outputs:
                if tensor.name not in encodings and not source.per_channel:
                    _set_activation(module, tensor.name, source)
                    restored += 1
    for node in module.graph.nodes:
        producer = node.inputs[0].inputs[0] if node.inputs and node.inputs[0].inputs else None
        if (producer is not None and _fused(producer, node) and len(node.inputs[0].outputs) == 1
                and node.inputs[0].name not in encodings and node.outputs[0].name in encodings):
            _set_activation(module, node.inputs[0].name, encodings[node.outputs[0].name])
            restored += 1
    return restored
