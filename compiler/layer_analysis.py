"""Per-layer accuracy of a QDQ model against its float model: where accuracy is lost, and why.

Works on any QDQ ONNX model (qcc's insert-qdq, onnxruntime's quantize_static, ...) next to the
float model it came from.

Mapping. Every DequantizeLinear (DQ) of QUANT is matched to the FLOAT tensor it stands for:
a DQ fed by a QuantizeLinear (Q) quantizes an activation, a DQ of a constant a weight or bias.
The FLOAT tensor is found, in order of trust, (1) by graph output name, (2) through the DQ's
consumers: the FLOAT node with the same name (or the same output names) and op type reads the
FLOAT tensor at the same input index, which survives quantizers that drop a Relu into the Q's
range (onnxruntime does), (3) by walking Q -> DQ pairs back to the tensor that was quantized,
with the usual suffixes (``_QuantizeLinear_Input``, ``_DequantizeLinear_Output``, ``_quantized``)
removed. A weight matches only if its dequantized values are FLOAT's on the DQ's grid (within one
step; an int32 bias of the same shape always, as bias correction moves it on purpose), so FLOAT
must be the model the quantizer started from (after fold-bn and the like); a DQ
matching nothing is listed in ``unmatched``, never guessed, and layers reading an unmatched weight
get blame ``unknown``. A quantized tensor read only by a Relu/Clip that is quantized itself (qcc
quantizes a conv output with its Relu's range) is not a row: on HTP the two are one op, and the
Relu's output carries the error (``fused``). A tensor read only by a saturating activation (HardSwish,
HardSigmoid, Sigmoid, Tanh; propagate-encodings clamps such inputs to the interval that matters) is
compared after that function, applied to both sides (``then``), so errors it discards do not count.

Errors, per quantized activation ``t`` (rows in FLOAT's topological order), against FLOAT's ``t``:
- accumulated: QUANT as it is: everything upstream quantized;
- local: QUANT with every quantized activation's consumers fed the FP32 value instead of the DQ
  output (one session, the FP32 values enter as extra graph inputs), so each layer — the float
  ops between two quantization points — runs on exact inputs and only its own weights and its
  output quantizer err. A single bad layer stands out from drift;
- blame: the local error split into its two causes, each measured alone: weights only (FLOAT
  with the dequantized weights, again fed FP32 activations) and activations only
  (``fake_quantize`` of FLOAT's ``t`` with ``t``'s encoding, numpy). ``weights`` when weights
  cause at least 2/3 of the noise energy, ``activations`` when they cause at most 1/3, else ``both``.
  Biases stay FLOAT's in both: bias correction moves them to offset the weights' and (mode=sequential)
  the activations' mean error together, so a corrected bias belongs to neither cause alone. The split
  is each cause's raw error, which bias correction then reduces in QUANT (an example on det:
  docs/measurements.md).
Final outputs are also measured with only weights or only activations quantized (QNN's
first triage step), which says whether per-channel weights or 16-bit activations will help.

Metrics: cosine per sample (mean and min over samples) and SQNR = 10 log10(Σ ref² / Σ (q - ref)²)
in dB over all samples (None when the error is exactly zero). Samples stream one at a time; memory
holds one sample's activations per session. Sessions run with graph optimisations off
(compiler.runtime), so QDQ is simulated exactly.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from compiler.encoding import FUSED_ACTIVATIONS, Encoding, encoding_from_qdq, fake_quantize
from compiler.ir import QccError
from compiler.linear import LINEAR_OPS
from compiler.progress import Progress
from compiler.runtime import make_session

QDQ_DOMAINS = ("", "ai.onnx", "com.microsoft")
NAME_SUFFIXES = ("_QuantizeLinear_Input", "_QuantizeLinear_Output", "_DequantizeLinear_Output", "_quantized", "_dq", "_q")
WEIGHTS_BLAME_SHARE = 2 / 3
FP32_INPUT_PREFIX = "qcc_fp32__"

_INT_RANGES = {
    onnx.TensorProto.UINT8: (0, 255), onnx.TensorProto.INT8: (-128, 127),
    onnx.TensorProto.UINT16: (0, 65535), onnx.TensorProto.INT16: (-32768, 32767),
    onnx.TensorProto.INT32: (-(2 ** 31), 2 ** 31 - 1),
    onnx.TensorProto.UINT4: (0, 15), onnx.TensorProto.INT4: (-8, 7),
}
_BITS = {onnx.TensorProto.UINT8: 8, onnx.TensorProto.INT8: 8, onnx.TensorProto.UINT16: 16, onnx.TensorProto.INT16: 16,
         onnx.TensorProto.INT32: 32, onnx.TensorProto.UINT4: 4, onnx.TensorProto.INT4: 4}


def _hard_sigmoid(x, alpha=0.2, beta=0.5):
    return np.clip(alpha * x + beta, 0.0, 1.0)


# Activations that discard part of their input's range: a tensor read only by one of them is compared after
# it (both sides through the same function), so errors the activation removes do not count.
SATURATING = {
    "HardSwish": lambda x: x * np.clip(x + 3.0, 0.0, 6.0) / 6.0,
    "HardSigmoid": _hard_sigmoid,
    "Sigmoid": lambda x: 0.5 * (1.0 + np.tanh(0.5 * x)),
    "Tanh": np.tanh,
}


def through(then: tuple | None, x: np.ndarray) -> np.ndarray:
    """``x`` through the saturating activation ``then`` (op, attributes), or unchanged."""
    if then is None:
        return x
    op, attrs = then
    return SATURATING[op](np.asarray(x, dtype=np.float32), **attrs).astype(np.float32)


def is_q(node: onnx.NodeProto) -> bool:
    return node.op_type == "QuantizeLinear" and node.domain in QDQ_DOMAINS


def is_dq(node: onnx.NodeProto) -> bool:
    return node.op_type == "DequantizeLinear" and node.domain in QDQ_DOMAINS


class GraphIndex:
    """Name indexes over a ModelProto's graph."""

    def __init__(self, model: onnx.ModelProto):
        graph = model.graph
        self.model = model
        self.nodes = list(graph.node)
        self.producer = {out: i for i, node in enumerate(self.nodes) for out in node.output if out}
        self.consumers: dict[str, list[int]] = {}
        for i, node in enumerate(self.nodes):
            for name in node.input:
                if name:
                    self.consumers.setdefault(name, []).append(i)
        self.initializers = {t.name: t for t in graph.initializer}
        self.inputs = [i.name for i in graph.input if i.name not in self.initializers]
        self.outputs = [o.name for o in graph.output]
        names = [n.name for n in self.nodes if n.name]
        unique = {name for name in names if names.count(name) == 1} if len(names) < 5000 else set(names)
        self.by_name = {n.name: i for i, n in enumerate(self.nodes) if n.name in unique}
        self.tensors = set(self.producer) | set(self.initializers) | set(self.inputs)

    def constant(self, name: str) -> np.ndarray | None:
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        index = self.producer.get(name)
        if index is not None and self.nodes[index].op_type == "Constant":
            for attr in self.nodes[index].attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
        return None

    def is_constant(self, name: str) -> bool:
        return name in self.initializers or (name in self.producer and self.nodes[self.producer[name]].op_type == "Constant")


@dataclass(frozen=True)
class QdqParams:
    """A DQ's parameters: x = (q - zero_point) * scale with q in [qmin, qmax]."""
    scale: np.ndarray
    zero_point: np.ndarray
    qmin: int
    qmax: int
    bits: int
    axis: int | None

    @property
    def encoding(self) -> Encoding:
        """The same grid as a compiler.encoding.Encoding."""
        zero_point = np.broadcast_to(self.zero_point, np.shape(self.scale))
        return encoding_from_qdq(self.scale, zero_point, self.axis, self.bits)

    @property
    def min(self) -> float:
        return float(np.min((self.qmin - self.zero_point.astype(np.float64)) * self.scale))

    @property
    def max(self) -> float:
        return float(np.max((self.qmax - self.zero_point.astype(np.float64)) * self.scale))

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        scale, zero = self.scale.astype(np.float64), self.zero_point.astype(np.float64)
        if self.axis is not None and scale.size > 1:
            shape = [1] * q.ndim
            shape[self.axis] = -1
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        return ((q.astype(np.float64) - zero) * scale).astype(self.scale.dtype)


def activation_quantizers(g: GraphIndex) -> list[tuple[int, int]]:
    """(QuantizeLinear, DequantizeLinear) node indexes of every activation quantizer, in graph order: a DQ
    whose input a Q writes (a constant's DQ reads an initializer instead)."""
    pairs = []
    for index, node in enumerate(g.nodes):
        source = g.producer.get(node.input[0]) if is_dq(node) else None
        if source is not None and is_q(g.nodes[source]):
            pairs.append((source, index))
    return pairs


def dq_params(g: GraphIndex, dq: onnx.NodeProto) -> QdqParams | None:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in dq.attribute}
    if attrs.get("block_size"):
        return None
    scale = g.constant(dq.input[1]) if len(dq.input) > 1 else None
    if scale is None:
        return None
    zero = g.constant(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
    if zero is not None:
        elem = onnx.helper.np_dtype_to_tensor_dtype(zero.dtype)
    else:
        elem = _dq_input_type(g, dq)
        zero = np.zeros_like(scale, dtype=np.int64)
    if elem not in _INT_RANGES:
        return None
    qmin, qmax = _INT_RANGES[elem]
    axis = int(attrs.get("axis", 1)) if np.ndim(scale) and np.size(scale) > 1 else None
    return QdqParams(np.asarray(scale), np.asarray(zero), qmin, qmax, _BITS[elem], axis)


def _dq_input_type(g: GraphIndex, dq: onnx.NodeProto) -> int:
    """The integer type of a DQ's input when it has no zero point: from the constant, or the Q's output_dtype."""
    value = g.constant(dq.input[0])
    if value is not None:
        return onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
    index = g.producer.get(dq.input[0])
    if index is not None and is_q(g.nodes[index]):
        for attr in g.nodes[index].attribute:
            if attr.name == "output_dtype" and attr.i:
                return attr.i
    return onnx.TensorProto.UINT8


@dataclass
class QuantizedTensor:
    """A quantized activation: FLOAT's tensor and where QUANT holds its quantized value."""
    name: str                 # tensor in FLOAT
    dq_output: str            # QUANT tensor holding the dequantized value consumers read
    params: QdqParams
    depth: int                # position in FLOAT's topological order (0 = graph input)
    op: str                   # FLOAT producer op, "input" for a graph input
    node: str                 # FLOAT producer node name
    extra_dq_outputs: list = field(default_factory=list)  # other DQs of the same tensor
    then: tuple | None = None  # (op, attributes) of the saturating activation that alone reads it


@dataclass
class WeightUse:
    """A quantized constant read by one node input: QUANT (node, index) and FLOAT (node, index)."""
    dq_output: str
    quant_node: int
    float_node: int
    index: int
    float_name: str
    params: QdqParams
    dequantized: np.ndarray
    float_value: np.ndarray
    bias: bool = False  # an int32 bias, or the constant of an Add after a linear layer


@dataclass
class QdqMapping:
    activations: list[QuantizedTensor]
    weights: list[WeightUse]
    outputs: list[tuple[str, str]]   # (FLOAT output, QUANT output)
    unmatched: list[str]
    fused: list[tuple[str, str]] = field(default_factory=list)  # (tensor, activation output it is fused into)
    mismatched_nodes: set = field(default_factory=set)  # FLOAT nodes whose weights QUANT quantized differently


def quantizes(float_value: np.ndarray, dequantized: np.ndarray, params: QdqParams) -> bool:
    """Whether ``dequantized`` is ``float_value`` on the DQ's grid: at least 99 % of the values within one
    step (nearest rounding gives half a step, AdaRound-style rounding one). A rewritten weight (BN folded
    on one side only, padded, ...) fails."""
    if float_value.shape != dequantized.shape:
        return False
    scale = params.scale.astype(np.float64)
    if params.axis is not None and scale.size > 1:
        shape = [1] * float_value.ndim
        shape[params.axis] = -1
        scale = scale.reshape(shape)
    close = np.abs(dequantized.astype(np.float64) - float_value) <= 1.01 * scale + 1e-12
    return bool(close.mean() >= 0.99)


def _is_bias_add(g: GraphIndex, index: int) -> bool:
    """Whether node ``index`` adds a constant to a linear layer's output (paddle2onnx's MatMul + Add bias),
    through that output's Q/DQ pair if it has one."""
    node = g.nodes[index]
    if node.op_type != "Add":
        return False
    for name in node.input:
        producer = g.producer.get(name)
        while producer is not None and (is_dq(g.nodes[producer]) or is_q(g.nodes[producer])):
            producer = g.producer.get(g.nodes[producer].input[0])
        if producer is not None and g.nodes[producer].op_type in LINEAR_OPS:
            return True
    return False


def _match_node(fg: GraphIndex, node: onnx.NodeProto) -> int | None:
    """The FLOAT node corresponding to a QUANT node: same name and op, else one that writes the same output."""
    index = fg.by_name.get(node.name) if node.name else None
    if index is not None and fg.nodes[index].op_type == node.op_type:
        return index
    for out in node.output:
        index = fg.producer.get(out)
        if index is not None and fg.nodes[index].op_type == node.op_type:
            return index
    return None


def _strip(name: str) -> list[str]:
    found = [name]
    for suffix in NAME_SUFFIXES:
        if name.endswith(suffix):
            found.append(name[: -len(suffix)])
    return found


def map_qdq(float_model: onnx.ModelProto, quant_model: onnx.ModelProto) -> QdqMapping:
    fg, qg = GraphIndex(float_model), GraphIndex(quant_model)
    outputs = [(f, f) for f in fg.outputs if f in qg.outputs]
    if not outputs and len(fg.outputs) == len(qg.outputs):
        outputs = list(zip(fg.outputs, qg.outputs))
    output_of = {q: f for f, q in outputs}
    depth = {name: 0 for name in fg.inputs}
    for i, node in enumerate(fg.nodes):
        for out in node.output:
            depth.setdefault(out, i + 1)

    found: dict[str, QuantizedTensor] = {}
    weights, unmatched, fused, mismatched = [], [], [], set()
    for qi, dq in enumerate(qg.nodes):
        if not is_dq(dq):
            continue
        out = dq.output[0]
        params = dq_params(qg, dq)
        if params is None:
            unmatched.append(f"{out}: unsupported DequantizeLinear parameters (non-constant scale, block size or type)")
            continue
        users = [i for i in qg.consumers.get(out, []) if not is_q(qg.nodes[i]) and not is_dq(qg.nodes[i])]
        if qg.is_constant(dq.input[0]):
            dequantized = params.dequantize(qg.constant(dq.input[0]))
            for user in users:
                fnode = _match_node(fg, qg.nodes[user])
                reader = qg.nodes[user].name or qg.nodes[user].op_type
                bias = params.bits == 32 or _is_bias_add(qg, user)
                for index, name in enumerate(qg.nodes[user].input):
                    if name != out:
                        continue
                    float_name = fg.nodes[fnode].input[index] if fnode is not None and index < len(fg.nodes[fnode].input) else ""
                    float_value = fg.constant(float_name) if float_name else None
                    if float_value is None and fnode is not None and not float_name and params.bits == 32:
                        # A bias the quantizer added (bias correction on a conv without one): FLOAT's is zero.
                        float_value = np.zeros(dequantized.shape, dtype=np.float32)
                    if float_value is None:
                        unmatched.append(f"{out}: weight read by '{reader}' has no float counterpart")
                    elif not quantizes(float_value, dequantized, params) and not (
                            bias and float_value.shape == dequantized.shape):
                        # A bias may differ on purpose (bias correction); a rewrite shows in the weight.
                        unmatched.append(f"{out}: not a quantization of the float '{float_name}' (rewritten?)")
                    else:
                        weights.append(WeightUse(out, user, fnode, index, float_name, params, dequantized, float_value,
                                                 bias))
                        continue
                    if fnode is not None:
                        mismatched.add(fnode)
            continue
        source = qg.producer.get(dq.input[0])
        if source is None or not is_q(qg.nodes[source]):
            unmatched.append(f"{out}: input is neither a QuantizeLinear output nor a constant")
            continue
        into = _fused_into(qg, users, out, output_of)
        if into is not None:
            fused.append((qg.nodes[source].input[0], into))
            continue
        name = _float_activation(fg, qg, out, users, source, output_of)
        if name is None or fg.is_constant(name):
            unmatched.append(f"{out}: no float tensor found")
            continue
        if name in found:
            found[name].extra_dq_outputs.append(out)
            continue
        producer = fg.producer.get(name)
        found[name] = QuantizedTensor(name, out, params, depth.get(name, 0),
                                      fg.nodes[producer].op_type if producer is not None else "input",
                                      fg.nodes[producer].name if producer is not None else "",
                                      then=_saturating_reader(qg, users, out, output_of))
    activations = sorted(found.values(), key=lambda t: (t.depth, t.name))
    return QdqMapping(activations, weights, outputs, unmatched, fused, mismatched)


def _saturating_reader(qg: GraphIndex, users: list[int], out: str, output_of: dict) -> tuple | None:
    """(op, attributes) of the saturating activation that is this quantized tensor's only reader."""
    if out in output_of or len(users) != 1 or qg.nodes[users[0]].op_type not in SATURATING:
        return None
    node = qg.nodes[users[0]]
    return node.op_type, {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute if a.name in ("alpha", "beta")}


def _fused_into(qg: GraphIndex, users: list[int], out: str, output_of: dict) -> str | None:
    """The output of the Relu/Clip this quantized tensor feeds, when that is its only reader and is quantized
    itself: on HTP the producer and the activation are one op, so the tensor in between does not exist (its
    quantizer clamps as the activation does; the activation's own row carries that error)."""
    if out in output_of or len(users) != 1 or qg.nodes[users[0]].op_type not in FUSED_ACTIVATIONS:
        return None
    result = qg.nodes[users[0]].output[0]
    if any(is_q(qg.nodes[i]) for i in qg.consumers.get(result, [])):
        return result
    return None


def _float_activation(fg: GraphIndex, qg: GraphIndex, out: str, users: list[int], source: int, output_of: dict) -> str | None:
    if out in output_of and output_of[out] in fg.tensors:
        return output_of[out]
    votes: dict[str, int] = {}
    for user in users:
        fnode = _match_node(fg, qg.nodes[user])
        if fnode is None:
            continue
        for index, name in enumerate(qg.nodes[user].input):
            if name == out and index < len(fg.nodes[fnode].input) and fg.nodes[fnode].input[index]:
                votes[fg.nodes[fnode].input[index]] = votes.get(fg.nodes[fnode].input[index], 0) + 1
    if votes:
        return max(votes, key=lambda n: (votes[n], n))
    # Walk back through Q -> DQ (-> Q -> DQ ...) to the tensor that was quantized.
    tensor = qg.nodes[source].input[0]
    while tensor in qg.producer and is_dq(qg.nodes[qg.producer[tensor]]):
        upstream = qg.producer.get(qg.nodes[qg.producer[tensor]].input[0])
        if upstream is None or not is_q(qg.nodes[upstream]):
            break
        tensor = qg.nodes[upstream].input[0]
    for candidate in _strip(tensor) + _strip(out):
        if candidate in fg.tensors:
            return candidate
    return None


# --- Metrics ----------------------------------------------------------------------------------------

def sqnr_db(signal: float, noise: float) -> float | None:
    """10 log10(signal / noise); None when the noise is exactly zero (infinite SQNR)."""
    if noise <= 0:
        return None
    if signal <= 0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    # einsum accumulates float32 products in float64 without a converted copy; ``@`` / np.dot on long
    # vectors go to multithreaded OpenBLAS, tens of times slower when the cores are busy.
    return float(np.einsum("i,i->", a, b, dtype=np.float64))


class Reference:
    """A reference tensor prepared once for several comparisons: flat, with its energy."""

    def __init__(self, value: np.ndarray):
        self.values = np.ravel(value)
        self.energy = _dot(self.values, self.values)


NEAR_ZERO = 1e-3  # an FP32 output whose largest magnitude is below this has no direction to compare: no cosine


def output_metrics(pairs) -> dict:
    """Per output name: cosine mean and min over samples (near-zero FP32 outputs left out), SQNR dB over all,
    from (FP32 outputs, compiled outputs) per sample, each a dict by output name; one sample at a time."""
    stats, skipped, count = {}, {}, 0
    for reference, compiled in pairs:
        for name, ref in reference.items():
            meaningful = float(np.abs(ref).max(initial=0.0)) >= NEAR_ZERO
            stats.setdefault(name, ErrorStats()).update(Reference(ref.astype(np.float32)),
                                                        compiled[name].astype(np.float32), with_cosine=meaningful)
            skipped[name] = skipped.get(name, 0) + (not meaningful)
        count += 1
    return {name: {"cosine_mean": s.cos, "cosine_min": s.cos_min, "sqnr_db": s.sqnr, "samples": count,
                   "near_zero_samples": skipped[name]} for name, s in stats.items()}


class ErrorStats:
    """Streaming comparison of a tensor against its reference over samples."""

    def __init__(self):
        self.cosines: list[float] = []
        self.signal = 0.0
        self.noise = 0.0

    def update(self, ref: Reference, got: np.ndarray, with_cosine: bool = True) -> None:
        got = np.ravel(got)
        diff = got - ref.values
        self.signal += ref.energy
        self.noise += _dot(diff, diff)
        if with_cosine:
            got_energy = _dot(got, got)
            denom = math.sqrt(ref.energy * got_energy)
            # Same convention as tests.golden_cases.cosine: two all-zero tensors agree.
            self.cosines.append(_dot(ref.values, got) / denom if denom else float(not got_energy and not ref.energy))

    @property
    def cos(self) -> float | None:
        return float(np.mean(self.cosines)) if self.cosines else None

    @property
    def cos_min(self) -> float | None:
        return float(np.min(self.cosines)) if self.cosines else None

    @property
    def sqnr(self) -> float | None:
        return sqnr_db(self.signal, self.noise)


def blame_label(weights_noise: float, activations_noise: float) -> str:
    total = weights_noise + activations_noise
    if total <= 0:
        return "none"
    share = weights_noise / total
    if share >= WEIGHTS_BLAME_SHARE:
        return "weights"
    if share <= 1 - WEIGHTS_BLAME_SHARE:
        return "activations"
    return "both"


# --- Variant models ------------------------------------------------------------------------------

def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    return onnx.ModelProto.FromString(model.SerializeToString())


def _fresh(taken: set, hint: str) -> str:
    name, i = hint, 0
    while name in taken:
        i += 1
        name = f"{hint}_{i}"
    taken.add(name)
    return name


def _feed_fp32(model: onnx.ModelProto, rewire: dict[str, str], skip=lambda node: False) -> dict[str, str]:
    """Point every reader of a tensor in ``rewire`` (tensor -> FLOAT name) at a new graph input that will
    carry FLOAT's value. Returns graph input name -> FLOAT name."""
    taken = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input} | \
            {t.name for t in model.graph.initializer}
    fed: dict[str, str] = {}
    input_for: dict[str, str] = {}
    for node in model.graph.node:
        if skip(node):
            continue
        for i, name in enumerate(node.input):
            if name in rewire:
                float_name = rewire[name]
                if float_name not in input_for:
                    input_for[float_name] = _fresh(taken, FP32_INPUT_PREFIX + float_name)
                    fed[input_for[float_name]] = float_name
                node.input[i] = input_for[float_name]
    for input_name in fed:
        model.graph.input.append(onnx.helper.make_tensor_value_info(input_name, onnx.TensorProto.FLOAT, None))
    return fed


def _replace_inputs(model: onnx.ModelProto, replacements: list[tuple[int, int, np.ndarray]], hint: str) -> None:
    """Make input ``index`` of node ``node`` read a new initializer holding ``value``."""
    taken = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input} | \
            {t.name for t in model.graph.initializer}
    for node_index, index, value in replacements:
        node = model.graph.node[node_index]
        node.input.extend([""] * (index + 1 - len(node.input)))  # an input FLOAT's node lacks (an added bias)
        name = _fresh(taken, f"{node.input[index] or node.name or node.op_type}_{index}_{hint}")
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        node.input[index] = name


def weight_replacements(mapping: QdqMapping) -> tuple[list, list]:
    """(FLOAT node, index, dequantized weight) and (QUANT node, index, float weight) replacements. Biases stay
    FLOAT's on both sides: a corrected bias offsets the error of both weights and activations (bias
    correction), so it belongs to neither measured alone."""
    dequantized = [(u.float_node, u.index, u.dequantized.astype(u.float_value.dtype)) for u in mapping.weights
                   if not u.bias]
    floats = [(u.quant_node, u.index, u.float_value) for u in mapping.weights]
    return dequantized, floats


# --- Analysis --------------------------------------------------------------------------------------

@dataclass
class LayerReport:
    index: int
    name: str
    op: str
    node: str
    then: str                 # the saturating activation the tensor is compared after ("" if none)
    bits: int
    enc_min: float
    enc_max: float
    fp32_min: float
    fp32_max: float
    cos: float | None
    cos_min: float | None
    sqnr: float | None
    local_cos: float | None
    local_sqnr: float | None
    weights_sqnr: float | None
    activations_sqnr: float | None
    blame: str
    weight_bits: int | None
    weight_per_channel: bool | None


@dataclass
class OutputReport:
    name: str
    cos: float | None
    cos_min: float | None
    sqnr: float | None
    weights_only_cos: float | None = None
    weights_only_sqnr: float | None = None
    activations_only_cos: float | None = None
    activations_only_sqnr: float | None = None


@dataclass
class Analysis:
    layers: list[LayerReport]
    outputs: list[OutputReport]
    samples: int
    seconds: float
    unmatched: list[str]
    fused: list[dict] = field(default_factory=list)  # quantized tensors fused into the next Relu/Clip

    def worst(self, count: int) -> list[LayerReport]:
        """The layers adding the most error on their own: lowest local SQNR first (exact layers last)."""
        ranked = sorted(self.layers, key=lambda r: (math.inf if r.local_sqnr is None else r.local_sqnr, r.index))
        return ranked[:count]

    def to_dict(self) -> dict:
        return {"samples": self.samples, "seconds": round(self.seconds, 3),
                "outputs": [_finite_dict(asdict(o)) for o in self.outputs],
                "layers": [_finite_dict(asdict(r)) for r in self.layers],
                "unmatched": list(self.unmatched), "fused": list(self.fused)}


def _finite_dict(row: dict) -> dict:
    # JSON has no infinity: a non-finite SQNR (no noise, or no signal) is written as null.
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


class _Sessions:
    def __init__(self, float_model: onnx.ModelProto, quant_model: onnx.ModelProto, mapping: QdqMapping, with_blame: bool):
        rows = mapping.activations
        float_names = [r.name for r in rows]
        float_outputs = [f for f, _ in mapping.outputs]
        quant_outputs = [q for _, q in mapping.outputs]
        self.float = make_session(float_model, float_names + float_outputs)
        self.float_names = _unique(float_names + float_outputs)
        self.quant = make_session(quant_model, [r.dq_output for r in rows] + quant_outputs)
        self.quant_names = _unique([r.dq_output for r in rows] + quant_outputs)
        # Local: every reader of a quantized activation (not a Q re-quantizing it) reads FLOAT's value.
        rewire = {dq: r.name for r in rows for dq in [r.dq_output] + r.extra_dq_outputs}
        local = _copy(quant_model)
        self.local_fed = _feed_fp32(local, rewire, skip=lambda n: is_q(n) or is_dq(n))
        self.local = make_session(local, [r.dq_output for r in rows])
        if not with_blame:
            return
        dequantized, floats = weight_replacements(mapping)
        weights_only = _copy(float_model)
        _replace_inputs(weights_only, dequantized, "dequantized")
        self.weights_only = make_session(weights_only, float_outputs)
        weights_local = _copy(weights_only)
        self.weights_local_fed = _feed_fp32(weights_local, {name: name for name in float_names})
        self.weights_local = make_session(weights_local, float_names)
        activations_only = _copy(quant_model)
        _replace_inputs(activations_only, floats, "float")
        self.activations_only = make_session(activations_only, quant_outputs)


def _unique(names: list[str]) -> list[str]:
    return list(dict.fromkeys(names))


def _run(session, names: list[str], feed: dict) -> dict:
    wanted = {i.name for i in session.get_inputs()}
    return dict(zip(names, session.run(names, {k: v for k, v in feed.items() if k in wanted})))


def analyze(float_model: onnx.ModelProto, quant_model: onnx.ModelProto, samples, *, with_blame: bool = True,
            progress: bool | None = None) -> Analysis:
    """Compare QUANT against FLOAT on ``samples`` (an iterable of input dicts); see the module docstring."""
    start = time.perf_counter()
    mapping = map_qdq(float_model, quant_model)
    if not mapping.activations and not mapping.outputs:
        raise QccError("the quantized model has no QuantizeLinear/DequantizeLinear pair matching a float tensor "
                       "and no output in common with the float model")
    sessions = _Sessions(float_model, quant_model, mapping, with_blame)
    rows = mapping.activations
    fields = ("acc", "local", "weights", "activations")
    stats = {(r.name, kind): ErrorStats() for r in rows for kind in fields}
    ranges = {r.name: [math.inf, -math.inf] for r in rows}
    outputs = {(f, kind): ErrorStats() for f, _ in mapping.outputs for kind in ("acc", "weights", "activations")}
    skipped: dict[str, str] = {}
    count = 0
    total = len(samples) if hasattr(samples, "__len__") else None
    with Progress(total, "analyze", enabled=progress) as bar:
        for sample in samples:
            ref = _run(sessions.float, sessions.float_names, sample)
            got = _run(sessions.quant, sessions.quant_names, sample)
            local = _run(sessions.local, [r.dq_output for r in rows],
                         {**sample, **{k: ref[v] for k, v in sessions.local_fed.items()}})
            if with_blame:
                weights_local = _run(sessions.weights_local, [r.name for r in rows],
                                     {**sample, **{k: ref[v] for k, v in sessions.weights_local_fed.items()}})
                weights_out = _run(sessions.weights_only, [f for f, _ in mapping.outputs], sample)
                activations_out = _run(sessions.activations_only, [q for _, q in mapping.outputs], sample)
            for r in rows:
                value = ref[r.name]
                if value.shape != got[r.dq_output].shape:
                    skipped[r.name] = f"{r.name}: float shape {list(value.shape)} != quantized {list(got[r.dq_output].shape)}"
                    continue
                if value.size:
                    ranges[r.name][0] = min(ranges[r.name][0], float(value.min()))
                    ranges[r.name][1] = max(ranges[r.name][1], float(value.max()))
                reference = Reference(through(r.then, value))
                stats[r.name, "acc"].update(reference, through(r.then, got[r.dq_output]))
                stats[r.name, "local"].update(reference, through(r.then, local[r.dq_output]))
                stats[r.name, "activations"].update(reference, through(r.then, fake_quantize(value, r.params.encoding)),
                                                    with_cosine=False)
                if with_blame:
                    stats[r.name, "weights"].update(reference, through(r.then, weights_local[r.name]), with_cosine=False)
            for f, q in mapping.outputs:
                if ref[f].shape != got[q].shape:
                    raise QccError(f"output '{q}' of the quantized model has shape {list(got[q].shape)}, the float "
                                   f"model's '{f}' {list(ref[f].shape)}: are they the same network?")
                reference = Reference(ref[f])
                outputs[f, "acc"].update(reference, got[q])
                if with_blame:
                    outputs[f, "weights"].update(reference, weights_out[f])
                    outputs[f, "activations"].update(reference, activations_out[q])
            count += 1
            bar.advance()
    if not count:
        raise QccError("analyze: no samples")
    segments = _layer_segments(mapping, GraphIndex(float_model))
    weights_of = _layer_weights(mapping, segments)
    # Weights FLOAT does not hold as QUANT quantized them: no weights-only measure for those layers.
    known = lambda name: not (segments[name] & mapping.mismatched_nodes)
    layers = []
    for r in rows:
        if r.name in skipped:
            continue
        s = {kind: stats[r.name, kind] for kind in fields}
        w_bits, w_pc = weights_of.get(r.name, (None, None))
        blame = blame_label(s["weights"].noise, s["activations"].noise) if known(r.name) else "unknown"
        layers.append(LayerReport(
            index=r.depth, name=r.name, op=r.op, node=r.node, then=r.then[0] if r.then else "", bits=r.params.bits,
            enc_min=r.params.min, enc_max=r.params.max, fp32_min=ranges[r.name][0], fp32_max=ranges[r.name][1],
            cos=s["acc"].cos, cos_min=s["acc"].cos_min, sqnr=s["acc"].sqnr,
            local_cos=s["local"].cos, local_sqnr=s["local"].sqnr,
            weights_sqnr=s["weights"].sqnr if with_blame and known(r.name) else None,
            activations_sqnr=s["activations"].sqnr,
            blame=blame if with_blame else "",
            weight_bits=w_bits, weight_per_channel=w_pc))
    reports = []
    split = with_blame and not mapping.mismatched_nodes  # a partial swap of weights would measure neither
    for f, _ in mapping.outputs:
        acc, w, a = outputs[f, "acc"], outputs[f, "weights"], outputs[f, "activations"]
        reports.append(OutputReport(f, acc.cos, acc.cos_min, acc.sqnr,
                                    w.cos if split else None, w.sqnr if split else None,
                                    a.cos if split else None, a.sqnr if split else None))
    return Analysis(layers, reports, count, time.perf_counter() - start, mapping.unmatched + list(skipped.values()),
                    [{"tensor": t, "into": into} for t, into in mapping.fused])


def _layer_segments(mapping: QdqMapping, fg: GraphIndex) -> dict[str, set]:
    """Row tensor -> its layer: the FLOAT nodes between it and the quantized activations (or graph inputs) upstream."""
    quantized = {r.name for r in mapping.activations}
    segments = {}
    for r in mapping.activations:
        seen, todo = set(), [r.name]
        while todo:
            index = fg.producer.get(todo.pop())
            if index is None or index in seen:
                continue
            seen.add(index)
            todo += [t for t in fg.nodes[index].input if t and t not in quantized and not fg.is_constant(t)]
        segments[r.name] = seen
    return segments


def _layer_weights(mapping: QdqMapping, segments: dict) -> dict:
    """Row tensor -> (bits, per channel) of the weights its layer reads."""
    uses: dict[int, list[WeightUse]] = {}
    for use in mapping.weights:
        uses.setdefault(use.float_node, []).append(use)
    result = {}
    for name, nodes in segments.items():
        found = [u for index in nodes for u in uses.get(index, [])]
        # 32-bit constants are biases (int32 by convention): the narrowest other weight is the one that limits.
        narrow = [u for u in found if u.params.bits < 32] or found
        if narrow:
            result[name] = (min(u.params.bits for u in narrow), any(u.params.axis is not None for u in narrow))
    return result
