"""QDQ lowering: the encodings table materialised as QuantizeLinear/DequantizeLinear nodes, with QNN's
rules for which inputs are weights, biases, op parameters or data (the tables below). insert-qdq runs it
on the compiled model; every simulation (compiler.quantsim) runs the same code on a copy, so what qcc
measures is what it writes. passes/insert_qdq.py states the rewrite and its rules.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from compiler.calibration import activation_tensors
from compiler.config import QuantConfig
from compiler.encoding import (ALL, SHARED_ENCODING_OPS, Encoding, HtpArch, activation_encoding, encoding_from_qdq,
                               fixed_ranges, qdq_params, range_encoding, stored_values, weight_encoding)
from compiler.ir import Module, const_value, unique_name
from compiler.patterns import is_graph_output

MS_DOMAIN = "com.microsoft"
# Model metadata: JSON {constant's encoding name: its stored initializer}, so the encodings of
# quantized weights can be read back from a saved QDQ model (compiler.export).
QDQ_CONSTANTS_KEY = "qcc.qdq-constants"
INT32_MAX = 2 ** 31 - 1

# Float constant inputs that are parameters of the op, not data: they stay float.
PARAMETER_INPUTS = {
    "Clip": {1, 2}, "Resize": {1, 2, 3}, "Upsample": {1}, "BatchNormalization": {3, 4}, "Pad": {1, 2, 3},
    "Slice": {1, 2, 3, 4}, "Reshape": {1}, "Expand": {1}, "Tile": {1}, "Split": {1}, "Squeeze": {1},
    "Unsqueeze": {1}, "ReduceMean": {1}, "ReduceSum": {1}, "ReduceMax": {1}, "ReduceMin": {1}, "TopK": {1},
    "Range": {0, 1, 2}, "ConstantOfShape": {0},
}
WEIGHT_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "InstanceNormalization",
                        "LayerNormalization"})
BIAS_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "BatchNormalization", "InstanceNormalization", "LayerNormalization"})
# Weights stored unsigned over [min(0, w), max(0, w)], per tensor: QNN's HTP LayerNorm refuses a signed scale (int8
# symmetric, per tensor or per channel) beside an int32 bias, and takes uint8 (docs/htp-backend.md); AIMET's
# HTP configs make LayerNormalization's weight asymmetric too.
ASYMMETRIC_WEIGHT_OPS = frozenset({"LayerNormalization"})
# ... and at 8 bits whatever --weight-bits says: HTP v73 refuses a uint16 LayerNorm scale beside an int32 bias
# (PP-OCR rec at --act-bits 16 --weight-bits 16: every LayerNormalization "Failed to add node").
ASYMMETRIC_WEIGHT_BITS = 8


def weight_axis(node: gs.Node, weight: np.ndarray) -> int | None:
    """The output-channel axis of ``node``'s weight (input 1), or None where QNN takes it per tensor."""
    if node.op == "Conv" or node.op == "BatchNormalization":
        return 0
    if node.op == "ConvTranspose":
        return 1 if node.attrs.get("group", 1) == 1 else None
    if node.op == "Gemm" and weight.ndim == 2:
        return 0 if node.attrs.get("transB", 0) else 1
    return None


def _fits(enc: Encoding, weight: np.ndarray, axis: int | None) -> bool:
    if enc.axis is None:
        return len(enc.scale) == 1
    return enc.axis == axis and len(enc.scale) == weight.shape[axis]


class QdqLowering:
    """One lowering of ``module``'s encodings to QDQ nodes under ``config``; ``remark(where, message)``
    reports what stays float and why."""

    def __init__(self, module: Module, config: QuantConfig, remark: Callable[[object, str], None]):
        self.module, self.graph, self.config, self.remark = module, module.graph, config, remark

    def run(self) -> dict:
        """Lower in place; returns the stats (activations, weights, biases, constants quantized; rebitted, ...)."""
        module = self.module
        per_channel = self.config.per_channel
        if per_channel and module.opset < 13:
            self.remark("graph", f"opset {module.opset} < 13 has no per-axis DequantizeLinear; weights quantized per tensor "
                                f"(run upgrade-opset first)")
            per_channel = False
        self.stats = {"activations": 0, "weights": 0, "biases": 0, "constants": 0, "rebitted": 0}
        self.dequantized: dict[str, gs.Variable] = {}  # constant name -> its DQ output
        self.kept_float: set[tuple[int, int]] = set()  # (id(node), input index) deliberately left float
        self.stored: dict[str, str] = {}  # constant's encoding name -> its stored (quantized) initializer
        self.taken = set(self.graph.tensors()) | {n.name for n in self.graph.nodes} | set(module.encodings)

        activations = self._activations()
        for node in list(self.graph.nodes):
            if node.op in WEIGHT_OPS:
                self._quantize_weight_op(node, per_channel)
        for node in list(self.graph.nodes):
            self._quantize_constant_inputs(node)
        tensors = self.graph.tensors()
        for name in activations:
            self._quantize_activation(tensors[name])
        self.graph.cleanup(remove_unused_graph_inputs=False).toposort()
        if self.stored:
            recorded = json.loads(module.metadata.get(QDQ_CONSTANTS_KEY, "{}"))
            module.metadata[QDQ_CONSTANTS_KEY] = json.dumps({**recorded, **self.stored}, sort_keys=True)
        return {k: v for k, v in self.stats.items() if v}

    # --- activations ------------------------------------------------------------------------------

    def _activations(self) -> list[str]:
        """Float tensors to quantize now, with their encodings settled at the final bit-width."""
        module, tensors = self.module, self.graph.tensors()
        fixed = fixed_ranges(module)
        chosen, unencoded = [], []
        for name in activation_tensors(module):
            tensor = tensors[name]
            if _is_quantized(tensor):
                continue
            enc = module.encodings.get(name)
            if enc is None:
                if tensor.outputs or is_graph_output(self.graph, tensor):
                    unencoded.append(name)
                continue
            if enc.dtype != "int":
                continue
            bw = int(module.annotations.get(name, {}).get("act_bits", self.config.act_bits))
            if enc.bw != bw:
                module.encodings[name] = (range_encoding(*fixed[name], bw) if name in fixed else
                                          activation_encoding(float(enc.min[0]), float(enc.max[0]), bw))
                self.stats["rebitted"] += 1
            chosen.append(name)
        if unencoded:
            self.remark(unencoded[0], f"{len(unencoded)} float tensor(s) have no encoding and stay float "
                                          f"(run calibrate first): {', '.join(unencoded[:5])}")
            self.stats["unencoded"] = len(unencoded)
        return chosen

    def _quantize_activation(self, tensor: gs.Variable) -> None:
        enc = self.module.encodings[tensor.name]
        scale, zero_point = self._qparams(tensor.name, enc)
        domain = self._domain(enc)
        quantized = gs.Variable(self._name(f"{tensor.name}_q"), dtype=zero_point.dtype, shape=tensor.shape)
        if is_graph_output(self.graph, tensor) and tensor.inputs:
            # Keep the output's name on the DQ: the producer now writes a renamed float tensor.
            before = gs.Variable(self._name(f"{tensor.name}_float"), dtype=tensor.dtype, shape=tensor.shape)
            producer = tensor.inputs[0]
            producer.outputs[producer.outputs.index(tensor)] = before
            self._node("QuantizeLinear", [before, scale, zero_point], [quantized], domain)
            self._node("DequantizeLinear", [quantized, scale, zero_point], [tensor], domain)
        else:
            after = gs.Variable(self._name(f"{tensor.name}_dq"), dtype=tensor.dtype, shape=tensor.shape)
            users = list(tensor.outputs)
            self._node("QuantizeLinear", [tensor, scale, zero_point], [quantized], domain)
            self._node("DequantizeLinear", [quantized, scale, zero_point], [after], domain)
            for user in users:
                for i, value in enumerate(user.inputs):
                    if value is tensor:
                        user.inputs[i] = after
        self.stats["activations"] += 1

    # --- weights, biases and other constants --------------------------------------------------------

    def _quantize_weight_op(self, node: gs.Node, per_channel: bool) -> None:
        weight = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
        if weight is None or not np.issubdtype(weight.dtype, np.floating):
            return
        name = node.inputs[1].name
        axis = weight_axis(node, weight) if per_channel else None
        bias = const_value(node.inputs[2]) if node.op in BIAS_OPS and len(node.inputs) > 2 and node.inputs[2].name else None
        input_enc = self.module.encodings.get(node.inputs[0].name)
        shared = self.module.encodings.get(name) if name in self.dequantized else None
        if shared is not None and shared.axis in (None, weight_axis(node, weight)):
            enc = shared  # a weight shared by several nodes: one DequantizeLinear
            node.inputs[1] = self.dequantized[name]
        else:
            enc = self.module.encodings.get(name)
            if name in self.dequantized:  # shared by ops that need another axis (e.g. Gemm and MatMul)
                name, enc = self._name(name), None
            if enc is not None and not _fits(enc, weight, weight_axis(node, weight) if enc.per_channel else None):
                self.remark(node, f"encoding given for weight '{name}' does not match its shape {list(weight.shape)}; recomputed")
                enc = None
            if enc is None and node.op in ASYMMETRIC_WEIGHT_OPS:
                enc = activation_encoding(min(0.0, float(weight.min())), max(0.0, float(weight.max())),
                                          min(self.config.weight_bits, ASYMMETRIC_WEIGHT_BITS))
            if enc is None:
                # A layer promote-16bit moved to 16-bit activations may take 16-bit weights (annotation weight_bits).
                bits = int(self.module.annotations.get(node.inputs[1].name, {}).get("weight_bits", self.config.weight_bits))
                enc = weight_encoding(weight, bits, axis)
            if bias is not None and input_enc is not None and np.issubdtype(bias.dtype, np.floating) and enc.symmetric:
                enc = self._fit_bias(node, enc, bias, input_enc)
            self.module.encodings[name] = enc
            node.inputs[1] = self._dequantized_constant(name, weight, enc)
            self.stats["weights"] += 1
        if bias is not None and np.issubdtype(bias.dtype, np.floating):
            if input_enc is None:
                self.remark(node, f"input '{node.inputs[0].name}' has no encoding; bias left float")
                self.kept_float.add((id(node), 2))
                return
            self._quantize_bias(node, bias, input_enc, enc)

    def _fit_bias(self, node: gs.Node, weight_enc: Encoding, bias: np.ndarray, input_enc: Encoding) -> Encoding:
        """Raise weight scales whose bias scale s_in * s_w would overflow int32 for this bias."""
        scales = np.asarray(weight_enc.scale, dtype=np.float64)
        magnitude = np.abs(bias.astype(np.float64))
        limit = INT32_MAX * input_enc.scale[0] / 1.0001
        if not weight_enc.per_channel:
            raised = np.maximum(scales, magnitude.max(initial=0.0) / limit)
        elif magnitude.ndim and magnitude.shape[-1] == len(scales):
            raised = np.maximum(scales, magnitude.reshape(-1, len(scales)).max(axis=0) / limit)
        else:
            return weight_enc  # _quantize_bias leaves such a bias float
        if np.array_equal(raised, scales):
            return weight_enc
        self.remark(node, "weight scale raised so that the int32 bias does not overflow")
        self.stats["weight-scales-raised"] = self.stats.get("weight-scales-raised", 0) + 1
        return Encoding(bw=weight_enc.bw, scale=tuple(float(np.float32(s)) for s in raised), offset=weight_enc.offset,
                        symmetric=True, axis=weight_enc.axis)

    def _quantize_bias(self, node: gs.Node, bias: np.ndarray, input_enc: Encoding, weight_enc: Encoding) -> None:
        """int32, zero point 0, scale s_in * s_w along the bias's last axis (the output channels)."""
        input_scale = np.float32(input_enc.scale[0])
        if weight_enc.per_channel:
            if bias.ndim == 0 or bias.shape[-1] != len(weight_enc.scale):
                self.remark(node, f"bias shape {list(bias.shape)} does not match {len(weight_enc.scale)} weight channels; left float")
                self.kept_float.add((id(node), 2))
                return
            scales, axis = tuple(float(input_scale * np.float32(s)) for s in weight_enc.scale), bias.ndim - 1
        else:
            scales, axis = (float(input_scale * np.float32(weight_enc.scale[0])),), None
        enc = Encoding(bw=32, scale=scales, offset=tuple(-(2 ** 31) for _ in scales), symmetric=True, axis=axis)
        name = node.inputs[2].name
        if name in self.dequantized and self.module.encodings.get(name) == enc:
            node.inputs[2] = self.dequantized[name]
            return
        if name in self.dequantized:  # a bias shared by nodes with different input or weight scales
            name = self._name(name)
        self.module.encodings[name] = enc
        node.inputs[2] = self._dequantized_constant(name, bias, enc)
        self.stats["biases"] += 1

    def _quantize_constant_inputs(self, node: gs.Node) -> None:
        if node.op in ("QuantizeLinear", "DequantizeLinear"):
            return
        skip = PARAMETER_INPUTS.get(node.op, set())
        rule = SHARED_ENCODING_OPS.get(node.op)
        for index, tensor in enumerate(node.inputs):
            value = const_value(tensor) if tensor.name else None
            if index in skip or (id(node), index) in self.kept_float or value is None or not np.issubdtype(value.dtype, np.floating):
                continue
            if tensor.name in self.dequantized:
                node.inputs[index] = self.dequantized[tensor.name]
                continue
            shared = rule is not None and (rule.inputs == ALL or index in rule.inputs)
            enc = self.module.encodings.get(tensor.name)
            if enc is None and shared and node.outputs[0].name in self.module.encodings:
                enc = self.module.encodings[node.outputs[0].name]
            if enc is None:
                enc = activation_encoding(float(value.min(initial=0.0)), float(value.max(initial=0.0)), self.config.act_bits)
            self.module.encodings[tensor.name] = enc
            node.inputs[index] = self._dequantized_constant(tensor.name, value, enc)
            self.stats["constants"] += 1

    def _dequantized_constant(self, name: str, value: np.ndarray, enc: Encoding) -> gs.Variable:
        """``@name_quantized -> DequantizeLinear -> %name_dq``, shared by every use of the constant."""
        stored = gs.Constant(self._name(f"{name}_quantized"), stored_values(value, enc))
        scale, zero_point = self._qparams(name, enc)
        out = gs.Variable(self._name(f"{name}_dq"), dtype=np.float32, shape=list(value.shape))
        attrs = {"axis": enc.axis} if enc.per_channel else {}
        self._node("DequantizeLinear", [stored, scale, zero_point], [out], self._domain(enc), attrs)
        self.dequantized[name] = out
        self.stored[name] = stored.name
        return out

    # --- helpers -----------------------------------------------------------------------------------

    def _qparams(self, name: str, enc: Encoding) -> tuple[gs.Constant, gs.Constant]:
        scale, zero_point = qdq_params(enc)
        scale_const = gs.Constant(self._name(f"{name}_scale"), scale)
        zp_const = gs.Constant(self._name(f"{name}_zero_point"), zero_point)
        return scale_const, zp_const

    def _name(self, hint: str) -> str:
        """A tensor name unused in the graph and the encodings table."""
        return unique_name(self.graph, hint, self.taken)

    def _domain(self, enc: Encoding) -> str:
        standard = enc.bw in (4, 8, 32) or self.module.opset >= 21
        return "" if standard else MS_DOMAIN

    def _node(self, op: str, inputs: list, outputs: list, domain: str, attrs: dict | None = None) -> None:
        self.graph.nodes.append(gs.Node(op, inputs=inputs, outputs=outputs, attrs=attrs or {}, domain=domain))


def _is_quantized(tensor) -> bool:
    produced_by_dq = bool(tensor.inputs) and tensor.inputs[0].op == "DequantizeLinear"
    return produced_by_dq or any(user.op == "QuantizeLinear" for user in tensor.outputs)


def lower_to_qdq(module: Module, config: QuantConfig, remark: Callable[[object, str], None] = lambda where, message: None) -> dict:
    """insert-qdq's rewrite (passes/insert_qdq.py states it): ``module``'s encodings become QDQ nodes, in place."""
    return QdqLowering(module, config, remark).run()


def lowered_copy(module: Module, config: QuantConfig, encodings: dict | None = None,
                 wide_weights: frozenset = frozenset(), constants: dict | None = None) -> Module:
    """A clone of ``module`` (its encodings updated with ``encodings``) lowered as insert-qdq lowers it, every
    activation at the width of its encoding (so nothing is re-derived), the weights named in ``wide_weights``
    at 16 bits and the constants named in ``constants`` holding those values."""
    qdq = module.clone()
    qdq.encodings.update(encodings or {})
    for name in wide_weights:
        qdq.annotate(name, weight_bits=16)
    tensors = qdq.graph.tensors() if constants else {}
    for name, value in (constants or {}).items():
        tensors[name].values = value
    widths = [enc.bw for enc in qdq.encodings.values() if enc.dtype == "int" and not enc.symmetric]
    for name, enc in qdq.encodings.items():
        if enc.dtype == "int":
            qdq.annotate(name, act_bits=enc.bw)
    lower_to_qdq(qdq, dataclasses.replace(config, act_bits=max(widths, default=config.act_bits)))
    return qdq


def arch_problems(module: Module, arch: HtpArch) -> list[str]:
    """Each layer of the QDQ ``module`` whose stored weight ``arch`` does not take, as one line naming the node
    and the rule: 16-bit weights on v68 and v69, 16-bit weights beside 8-bit activations on any generation
    (v73 refuses every Conv, ConvTranspose and Gemm of det stored W16A8: "Failed to add node"), and a LayerNorm
    scale wider than ASYMMETRIC_WEIGHT_BITS beside an int32 bias (docs/htp-backend.md)."""
    problems = []
    for node in module.graph.nodes:
        bits = _stored_bits(node, 1) if node.op in WEIGHT_OPS else None
        if bits is None:
            continue
        problem = arch.weight_problem(bits)
        activation = _activation_bits(node.inputs[0]) if node.inputs else None
        if not problem and bits == 16 and activation is not None and activation < 16:
            problem = f"16-bit weight with {activation}-bit activations; HTP takes 16-bit weights at 16-bit activations only"
        if not problem and node.op in ASYMMETRIC_WEIGHT_OPS and bits > ASYMMETRIC_WEIGHT_BITS and _stored_bits(node, 2) == 32:
            problem = f"{bits}-bit scale beside an int32 bias; HTP takes the scale at {ASYMMETRIC_WEIGHT_BITS} bits"
        if problem:
            problems.append(f"node '{node.name or node.outputs[0].name}' ({node.op}): {problem}")
    return problems


def _stored_bits(node: gs.Node, index: int) -> int | None:
    """The width input ``index`` of ``node`` is stored at, when a DequantizeLinear of an integer constant gives it."""
    tensor = node.inputs[index] if len(node.inputs) > index else None
    dq = tensor.inputs[0] if tensor is not None and tensor.inputs else None
    stored = const_value(dq.inputs[0]) if dq is not None and dq.op == "DequantizeLinear" else None
    return None if stored is None or stored.dtype.kind not in "iu" else stored.dtype.itemsize * 8


def _activation_bits(tensor) -> int | None:
    """The width a DequantizeLinear of an activation gives ``tensor`` (None for anything else)."""
    dq = tensor.inputs[0] if tensor.inputs else None
    if dq is None or dq.op != "DequantizeLinear" or len(dq.inputs) < 3 or isinstance(dq.inputs[0], gs.Constant):
        return None
    zero_point = const_value(dq.inputs[2])
    return None if zero_point is None else np.dtype(zero_point.dtype).itemsize * 8


# --- re-deriving encodings and stored constants at another width (insert-converts, mixed precision) ------

def rebit(enc: Encoding, bw: int, fixed: tuple | None = None) -> Encoding:
    """``enc`` re-derived at ``bw`` bits over the same range (insert-qdq's rule: fixed ranges exactly)."""
    return range_encoding(*fixed, bw) if fixed else activation_encoding(float(enc.min[0]), float(enc.max[0]), bw)


def convert_encoding(enc: Encoding, bw: int, fixed: tuple | None = None, narrow: tuple | None = None) -> Encoding:
    """The encoding a tensor of encoding ``enc`` is converted to for an op computing at ``bw`` bits: its
    range re-derived, except that a tensor promote-16bit widened (``narrow``: its 8-bit range, calibrated
    with clipping) goes down to that range, not to its 16-bit min-max range on 8 bits."""
    if narrow is not None and bw < enc.bw and not fixed:
        return activation_encoding(narrow[0], narrow[1], bw)
    return rebit(enc, bw, fixed)


def requantized_constant(stored, scale, zero_point, width: int) -> tuple[np.ndarray, Encoding] | None:
    if stored is None or scale is None or zero_point is None or np.size(scale) != 1:
        return None
    if np.dtype(stored.dtype).kind != "u" or np.dtype(stored.dtype).itemsize * 8 == width:
        return None
    enc = encoding_from_qdq(np.asarray(scale), np.asarray(zero_point), None)
    values = (stored.astype(np.float64) - np.asarray(zero_point, dtype=np.float64)) * float(scale)
    target = rebit(enc, width)
    return stored_values(values, target), target


def rebiased(stored: np.ndarray, scale: np.ndarray, weight_scale: np.ndarray, input_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """An int32 bias (stored values, scale) re-derived for a new input scale: scale s_in * s_w in float32
    as insert-qdq computes it, values the dequantized bias rounded on the new grid."""
    new_scale = (np.float32(input_scale) * np.asarray(weight_scale, dtype=np.float32)).astype(np.float32)
    new_scale = np.broadcast_to(new_scale, np.shape(scale)).astype(np.float32)
    per_channel = np.ndim(new_scale) == 1 and new_scale.size > 1
    enc = Encoding(bw=32, scale=tuple(float(v) for v in np.ravel(new_scale)), offset=(-(2 ** 31),) * new_scale.size,
                   symmetric=True, axis=stored.ndim - 1 if per_channel else None)
    values = stored.astype(np.float64) * np.asarray(scale, dtype=np.float64)
    return stored_values(values, enc), new_scale
