"""Move the activations that cost the most accuracy to 16 bits until the outputs are close enough to FP32.

Runs after calibrate (and propagate-encodings), before insert-qdq; insert-converts must follow
insert-qdq. Label-free: the quantized model is compared with the FP32 model (``ctx.reference``: the
module before the first pass that may move its float outputs, such as bias correction) on
``samples`` calibration samples.

HTP computes each op at one width, its output's: activation inputs of another width are converted
(insert-converts), so an edge t -> op carries t at min(width of t, width of the op). A tensor at 16
bits gains only where its readers compute at 16 bits too; the unit of promotion is therefore a
tensor with the outputs of the ops that read it (plus what must share their width, below).

1. Simulate. insert-qdq runs on a clone (every activation at its current width; weights as
   ``weight-bits`` / ``per-channel`` will quantize them), and once more with every unsigned
   activation at 16 bits. Each activation's QuantizeLinear -> DequantizeLinear pair, and each edge
   from it to an op with a quantized output, becomes Clip(lo, hi) -> QuantizeLinear ->
   DequantizeLinear on a 16-bit container with lo, hi, scale and zero point fed at run time: the
   tensor's own quantizer, then the edge's convert (an exact identity when the widths agree).
   Constants whose quantization follows their node's input width (biases: scale s_in * s_w) are
   dequantized both ways and picked with Where. One onnxruntime session thus runs, bit for bit, the
   model insert-qdq + insert-converts would write for any choice of widths.
2. Group. Tensors that must share a width move together: shared-encoding ops
   (compiler.encoding.SHARED_ENCODING_OPS: Concat inputs and output, MaxPool, Reshape, ...; no
   convert inside a data-movement chain), a producer fused with its Relu/Clip (no convert inside the
   fused op), and BIT_WIDTH_TIES (MatMul's two activation inputs: 8x8 or 16x16).
3. Rank by cost. A unit's cost is the output error it causes: error(as is) - error(this unit alone
   at 16 bits), Σ ||q - f||² / Σ ||f||² over outputs, on the first ``screen-samples`` samples.
   Units that cost nothing are never promoted.
4. Choose. Costliest first, the units that fit the budget (``budget``: share of activation tensors
   at 16 bits) form a list; the shortest prefix of it whose output cosine (mean over ``samples``
   samples and outputs) reaches ``target-cos`` is promoted: prefixes of 1, 2, 4, ... units until
   one does, then bisection (the greedy one-unit-at-a-time result in log2 evaluations). Short of
   the target, the best prefix measured is promoted and the remaining units are ranked again
   against the new state (a unit that did not matter next to a worse one may matter now), up to
   ``rounds`` times; a remark says whether the budget or the weights (all activations at 16 bits
   still miss it) stop it.
5. Apply. Promoted tensors get ``act_bits=16`` and the encoding a 16-bit pipeline gives them
   (``sixteen_bit_encodings``: min-max range, then propagate-encodings' rules; fixed ranges
   exactly), and the annotation ``narrow``: their 8-bit range, which insert-converts converts them
   down to for an 8-bit reader.

Stats: output cosine before and after, tensors promoted, 16-bit share, converts HTP will run. A
remark per promoted unit says why (the share of the output error it removes alone), and ``module.cache["promote-16bit"]``
holds the same as data; a second run with the same options finds it and changes nothing.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import networkx as nx
import numpy as np
import onnx
from onnx import helper, numpy_helper

from compiler.calibration import activation_tensors
from compiler.encoding import (ALL, FUSED_ACTIVATIONS, FUSIBLE_PRODUCERS, SHARED_ENCODING_OPS, Encoding,
                               activation_encoding, fixed_ranges, has_qdq, qdq_params)
from compiler.ir import Module, QccError, const_value
from compiler.layer_analysis import ErrorStats, GraphIndex, Reference, is_dq, is_q
from compiler.pass_manager import Pass, PassContext, PassKind, PassResult, make_pass, register
from compiler.progress import Progress
from compiler.runtime import make_session
from passes.insert_converts import convert_encoding, rebiased, rebit, requantized_constant
from passes.insert_qdq import BIAS_OPS, PARAMETER_INPUTS, WEIGHT_OPS, qdq_simulation

CACHE_KEY = "promote-16bit"
MS_DOMAIN = "com.microsoft"
# Op -> input indices whose activations HTP needs at one bit-width (MatMul of two activations: 8x8 or 16x16).
BIT_WIDTH_TIES = {"MatMul": (0, 1)}
# Run-time quantizer parameters of the simulation, one vector entry per quantizer: name and type.
PARAMETERS = (("lo", onnx.TensorProto.FLOAT), ("hi", onnx.TensorProto.FLOAT), ("scale", onnx.TensorProto.FLOAT),
              ("zero", onnx.TensorProto.UINT16))


def tie_graph(module: Module, names: set[str]) -> nx.Graph:
    """Tensors (among ``names``) joined when they must share one bit-width."""
    ties = nx.Graph()
    ties.add_nodes_from(names)
    for node in module.graph.nodes:
        rule = SHARED_ENCODING_OPS.get(node.op)
        if rule is not None:
            ins = node.inputs if rule.inputs == ALL else [node.inputs[i] for i in rule.inputs if i < len(node.inputs)]
            outs = node.outputs if rule.outputs == ALL else [node.outputs[i] for i in rule.outputs if i < len(node.outputs)]
            nx.add_path(ties, [t.name for t in list(ins) + list(outs) if t.name in names])
        if node.op in BIT_WIDTH_TIES:
            nx.add_path(ties, [node.inputs[i].name for i in BIT_WIDTH_TIES[node.op]
                               if i < len(node.inputs) and node.inputs[i].name in names])
        if node.op in FUSED_ACTIVATIONS and node.inputs and node.outputs:
            source = node.inputs[0]
            if source.inputs and source.inputs[0].op in FUSIBLE_PRODUCERS and len(source.outputs) == 1:
                nx.add_path(ties, [t for t in (source.name, node.outputs[0].name) if t in names])
    return ties


def promotion_units(module: Module, names: set[str]) -> list[list[str]]:
    """Per tensor: itself and the outputs of the ops reading it, closed under the ties; deduplicated, in graph order."""
    ties = tie_graph(module, names)
    component = {n: frozenset(c) for c in nx.connected_components(ties) for n in c}
    order = {n: i for i, n in enumerate(t.name for node in module.graph.nodes for t in list(node.inputs) + list(node.outputs))}
    order.update({t.name: -1 for t in module.graph.inputs})
    tensors = module.graph.tensors()
    units = {}
    for name in sorted(names, key=lambda n: order.get(n, 0)):
        members = {name} | {user.outputs[0].name for user in tensors[name].outputs
                            if user.outputs and user.outputs[0].name in names}
        unit = frozenset().union(*(component[m] for m in members))
        units.setdefault(unit, sorted(unit, key=lambda n: order.get(n, 0)))
    return list(units.values())


def constant_encodings(module: Module, wide: set[str]) -> dict:
    """16-bit encodings for the activation-like constants (what insert-qdq quantizes at the activation width:
    Add/Mul/Div operands, ...) of the nodes whose output is in ``wide``, over the constant's range as insert-qdq
    derives it; weights, biases, op parameters and shared-encoding ops' constants are left to insert-qdq."""
    encodings = {}
    for node in module.graph.nodes:
        if not node.outputs or node.outputs[0].name not in wide or node.op in SHARED_ENCODING_OPS:
            continue
        for index, tensor in enumerate(node.inputs):
            value = const_value(tensor) if tensor.name else None
            if (value is None or not np.issubdtype(value.dtype, np.floating) or index in PARAMETER_INPUTS.get(node.op, ())
                    or (node.op in WEIGHT_OPS and index == 1) or (node.op in BIAS_OPS and index == 2)):
                continue
            encodings[tensor.name] = activation_encoding(float(value.min(initial=0.0)), float(value.max(initial=0.0)), 16)
    return encodings


def sixteen_bit_encodings(module: Module, calib_data) -> dict:
    """Every activation's encoding as the 16-bit pipeline sets it: min-max ranges (at 16 bits clipping
    only costs accuracy) then propagate-encodings' sharing, fusion and clamps. A promoted tensor takes
    this one, not its 8-bit range re-derived at 16 bits: on det, 8-bit percentile ranges at 16 bits lost
    more than min-max ones (docs/measurements.md)."""
    probe = module.clone()
    for name in activation_tensors(probe):
        if probe.encodings.get(name) is not None and not probe.encodings[name].symmetric:
            del probe.encodings[name]
    quiet = PassContext(calib_data=calib_data, log=lambda message: None)
    for name, options in (("calibrate", {"method": "minmax", "act-bits": "16"}), ("propagate-encodings", {})):
        make_pass(name, options).run(probe, quiet)
    return {name: enc for name, enc in probe.encodings.items() if enc.bw >= 16 and not enc.symmetric}


@dataclass
class Measure:
    cos: float    # mean over samples and outputs
    error: float  # Σ ||q - f||² / Σ ||f||² over samples and outputs


class QdqSimulation:
    """The QDQ model of a module, its activation quantizers and converts parameterised at run time."""

    def __init__(self, module: Module, weight_bits: int, per_channel: bool, samples: list[dict],
                 reference: Module | None = None, sixteen_bit: dict | None = None):
        """``reference``: the FP32 model to compare with (default: ``module``'s float graph);
        ``sixteen_bit``: each activation's encoding when promoted (default: its range re-derived at 16 bits)."""
        self.fixed = fixed_ranges(module)
        self.base = dict(module.encodings)
        self.wide = {name: enc if enc.bw >= 16 else (sixteen_bit or {}).get(name) or rebit(enc, 16, self.fixed.get(name))
                     for name, enc in self.base.items() if enc.dtype == "int" and not enc.symmetric}
        self.qdq_model = self._insert_qdq(module, weight_bits, per_channel)
        # The same with every unsigned activation and activation-like constant at 16 bits: biases (scale
        # s_in * s_w) follow their input, constants are quantized from their float values.
        self.wide_model = self._insert_qdq(module, weight_bits, per_channel, self.wide)
        self.float_model = (reference or module).clone().to_onnx()
        g = GraphIndex(self.qdq_model)
        # (tensor, its DequantizeLinear): insert-qdq's Q reads the tensor, or for a graph output its DQ writes it.
        # Unsigned activations only: their 8- and 16-bit grids both fit the uint16 container.
        self.pairs = []
        for node in g.nodes:
            source = g.producer.get(node.input[0]) if is_dq(node) else None
            if source is None or not is_q(g.nodes[source]):
                continue
            name = node.output[0] if node.output[0] in g.outputs else g.nodes[source].input[0]
            if name in module.encodings and not module.encodings[name].symmetric:
                self.pairs.append((name, node.output[0]))
        # (tensor, reading node, input index, tensor the node writes): the edges insert-converts may convert.
        tensor_of_output = {g.nodes[g.producer[g.nodes[g.producer[dq]].input[0]]].input[0]: name for name, dq in self.pairs}
        self.edges = []
        for name, dq in self.pairs:
            for user in g.consumers.get(dq, []):
                node = g.nodes[user]
                writes = tensor_of_output.get(node.output[0]) if node.output and not is_q(node) and not is_dq(node) else None
                self.edges += [(name, user, i, writes) for i, x in enumerate(node.input) if x == dq and writes]
        self.outputs = [o.name for o in self.qdq_model.graph.output]
        self.samples = samples
        self.session = make_session(self._parameterised())
        reference = make_session(self.float_model)
        self.reference = [[Reference(v) for v in reference.run(self.outputs, s)] for s in samples]

    @staticmethod
    def _insert_qdq(module: Module, weight_bits: int, per_channel: bool, wide: dict | None = None) -> onnx.ModelProto:
        """The QDQ model as insert-qdq writes it; with ``wide``, every unsigned activation at its 16-bit encoding."""
        return qdq_simulation(module, weight_bits, per_channel, wide).to_onnx()

    def _parameterised(self) -> onnx.ModelProto:
        model = onnx.ModelProto.FromString(self.qdq_model.SerializeToString())
        default = next(o for o in model.opset_import if o.domain in ("", "ai.onnx"))
        domain = "" if default.version >= 21 else MS_DOMAIN
        if domain and not any(o.domain == MS_DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
        g = GraphIndex(model)
        replace: dict[int, list[onnx.NodeProto]] = {}
        # Parameters come as one vector per kind, gathered per quantizer: onnxruntime validates every feed on
        # every run, which for det's hundreds of scalars cost more than the run itself.
        for group, count in (("act", len(self.pairs)), ("edge", len(self.edges))):
            for key, dtype in PARAMETERS:
                model.graph.input.append(helper.make_tensor_value_info(f"qcc_{group}_{key}", dtype, [count]))
        model.graph.input.append(helper.make_tensor_value_info("qcc_act_wide", onnx.TensorProto.BOOL, [len(self.pairs)]))

        def quantizer(group: str, i: int, x: str, y: str) -> list[onnx.NodeProto]:
            tag = f"qcc_{group}{i}"
            model.graph.initializer.append(numpy_helper.from_array(np.array(i, dtype=np.int64), f"{tag}_index"))
            lo, hi, scale, zero = (f"{tag}_{key}" for key, _ in PARAMETERS)
            return [helper.make_node("Gather", [f"qcc_{group}_{key}", f"{tag}_index"], [f"{tag}_{key}"])
                    for key, _ in PARAMETERS] + [
                helper.make_node("Clip", [x, lo, hi], [f"{tag}_clip"]),
                helper.make_node("QuantizeLinear", [f"{tag}_clip", scale, zero], [f"{tag}_q"], domain=domain),
                helper.make_node("DequantizeLinear", [f"{tag}_q", scale, zero], [y], domain=domain)]

        head = []  # the width flags, first: a node may depend on the width of its own output
        for i, (_, dq_output) in enumerate(self.pairs):
            dq_index = g.producer[dq_output]
            q_index = g.producer[g.nodes[dq_index].input[0]]
            head.append(helper.make_node("Gather", ["qcc_act_wide", f"qcc_act{i}_index"], [f"qcc_act{i}_wide"]))
            replace[dq_index] = quantizer("act", i, g.nodes[q_index].input[0], dq_output)
            replace[q_index] = []
        self._switch_constants(model, g, replace, head)
        for e, (_, user, index, _) in enumerate(self.edges):
            node = g.nodes[user]
            replace.setdefault(user, [node])[-1:-1] = quantizer("edge", e, node.input[index], f"qcc_edge{e}_out")
            node.input[index] = f"qcc_edge{e}_out"
        nodes = head + [n for i, node in enumerate(g.nodes) for n in replace.get(i, [node])]
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        return model

    def _switch_constants(self, model: onnx.ModelProto, g: GraphIndex, replace: dict, head: list) -> None:
        """Constants whose quantization follows a width are dequantized every way and picked with Where, so
        any choice is bit-exact. An int32 bias follows its node's input, as insert-qdq derives it (from the
        tensor's own width) and insert-converts re-derives it (for the node's width). An activation-like
        constant is 16-bit (from its float value) when a node reading it computes at 16 bits
        (``constant_encodings``), and insert-converts rounds it to 8 bits for a node that does not."""
        wide = GraphIndex(self.wide_model)
        pair_of = {dq_output: i for i, (_, dq_output) in enumerate(self.pairs)}
        flag = {name: f"qcc_act{i}_wide" for i, (name, _) in enumerate(self.pairs)}
        writes = {user: w for _, user, _, w in self.edges}
        for node in g.nodes:
            if not is_dq(node) or not g.is_constant(node.input[0]) or node.output[0] not in wide.producer:
                continue
            base = [g.constant(name) for name in node.input]
            other = wide.nodes[wide.producer[node.output[0]]]
            widened = [wide.constant(name) for name in other.input]
            if all(v is not None and np.array_equal(v, b) for v, b in zip(widened, base)):
                continue
            users = g.consumers.get(node.output[0], [])
            if base[0].dtype.kind == "u" and len(base) == 3:
                self._constant(model, replace, g, node, other, widened, users, [flag[writes[u]] for u in users if u in writes],
                               {u: flag[writes[u]] for u in users if u in writes}, head)
                continue
            for user in users:
                consumer = g.nodes[user]
                if consumer.input[0] not in pair_of:
                    continue
                index = list(consumer.input).index(node.output[0])
                tensor = self.pairs[pair_of[consumer.input[0]]][0]
                # An int32 bias; else a weight whose scale insert-qdq raised for its bias, kept by insert-converts.
                self._bias(model, replace, g, wide, consumer, user, index, tensor, flag,
                           writes.get(user) if base[0].dtype == np.int32 else None, node, other)

    def _constant(self, model, replace, g, node, other, widened, users, reader_flags, flag_of, head) -> None:
        """Where(any reader wide, Where(this reader wide, 16-bit constant, rounded to 8 bits), constant)."""
        if not reader_flags:
            return
        tag = f"qcc_const_{node.output[0]}"
        any_wide = reader_flags[0]
        for k, other_flag in enumerate(reader_flags[1:]):
            head.append(helper.make_node("Or", [any_wide, other_flag], [f"{tag}_any{k}"]))
            any_wide = f"{tag}_any{k}"
        attrs = {a.name: helper.get_attribute_value(a) for a in other.attribute}
        sixteen = self._dequantize(model, f"{tag}_16", widened, other.domain, attrs)
        stored, enc = requantized_constant(*widened, 8)
        eight = self._dequantize(model, f"{tag}_8", [stored, *qdq_params(enc)], "", attrs)
        for user in users:
            consumer = g.nodes[user]
            index = list(consumer.input).index(node.output[0])
            user_tag = f"{tag}_{user}_{index}"
            if user in flag_of:
                nodes = [helper.make_node("Where", [flag_of[user], sixteen.output[0], eight.output[0]], [f"{user_tag}_wide"])]
                choice = [f"{user_tag}_wide", node.output[0]]
            else:
                nodes, choice = [], [sixteen.output[0], node.output[0]]
            self._read(replace, consumer, user, index, nodes, any_wide, choice, user_tag)
        head[:0] = [sixteen, eight]

    def _bias(self, model, replace, g, wide, consumer, user, index, tensor, flag, writes, base_dq, wide_dq) -> None:
        """Where(T wide, Where(node wide, wide bias, wide bias rebiased for 8 bits),
                         Where(node wide, bias rebiased for 16 bits, bias))."""
        tag = f"qcc_bias_{user}_{index}"
        attrs = {a.name: helper.get_attribute_value(a) for a in base_dq.attribute}
        nodes = [self._dequantize(model, f"{tag}_base", [g.constant(n) for n in base_dq.input], base_dq.domain, attrs),
                 self._dequantize(model, f"{tag}_wide", [wide.constant(n) for n in wide_dq.input], wide_dq.domain, attrs)]
        if writes is None:  # not a bias, or no quantized output: insert-converts leaves it alone
            self._read(replace, consumer, user, index, nodes, flag[tensor], [f"{tag}_wide", f"{tag}_base"], tag)
            return
        # The converts' encodings, as _feeds and insert-converts derive them: the 8-bit range up, the 16-bit one down.
        base_enc, fixed = self.base[tensor], self.fixed.get(tensor)
        up = base_enc if base_enc.bw >= 16 else rebit(base_enc, 16, fixed)
        down = convert_encoding(self.wide[tensor], 8, fixed, self.narrow(tensor))
        for key, source, dq, enc in (("up", g, base_dq, up), ("down", wide, wide_dq, down)):
            stored, scale, zero = (source.constant(n) for n in dq.input)
            weight = source.nodes[source.producer[consumer.input[1]]] if consumer.input[1] in source.producer else None
            if weight is None or not is_dq(weight) or source.constant(weight.input[1]) is None:
                return
            values, new_scale = rebiased(stored, scale, source.constant(weight.input[1]), enc.scale[0])
            nodes.append(self._dequantize(model, f"{tag}_{key}", [values, new_scale, zero], dq.domain, attrs))
        nodes += [helper.make_node("Where", [flag[writes], f"{tag}_wide", f"{tag}_down"], [f"{tag}_t16"]),
                  helper.make_node("Where", [flag[writes], f"{tag}_up", f"{tag}_base"], [f"{tag}_t8"])]
        self._read(replace, consumer, user, index, nodes, flag[tensor], [f"{tag}_t16", f"{tag}_t8"], tag)

    @staticmethod
    def _dequantize(model: onnx.ModelProto, name: str, values: list, domain: str, attrs: dict) -> onnx.NodeProto:
        inputs = [f"{name}_{k}" for k in range(len(values))]
        model.graph.initializer.extend(numpy_helper.from_array(np.asarray(v), n) for v, n in zip(values, inputs))
        return helper.make_node("DequantizeLinear", inputs, [name], domain=domain, **attrs)

    @staticmethod
    def _read(replace: dict, consumer, user: int, index: int, nodes: list, flag: str, choice: list, tag: str) -> None:
        """``consumer`` reads Where(flag, *choice) at ``index``; ``nodes`` run just before it."""
        replace.setdefault(user, [consumer])[-1:-1] = nodes + [helper.make_node("Where", [flag, *choice], [f"{tag}_pick"])]
        consumer.input[index] = f"{tag}_pick"

    def _feeds(self, encodings: dict) -> dict:
        acts = [self._parameters(encodings[name]) for name, _ in self.pairs]
        edges = []
        for name, _, _, writes in self.edges:
            enc, width = encodings[name], encodings[writes].bw
            edges.append(self._parameters(enc if enc.bw == width else
                                          self._convert(enc, width, self.fixed.get(name), self.narrow(name))))
        feed = {"qcc_act_wide": np.array([encodings[name].bw >= 16 for name, _ in self.pairs], dtype=np.bool_)}
        for group, rows in (("act", acts), ("edge", edges)):
            for (key, dtype), column in zip(PARAMETERS, zip(*rows) if rows else [()] * len(PARAMETERS)):
                feed[f"qcc_{group}_{key}"] = np.array(column, dtype=helper.tensor_dtype_to_np_dtype(dtype))
        return feed

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def _convert(enc: Encoding, width: int, fixed: tuple | None, narrow: tuple | None) -> Encoding:
        return convert_encoding(enc, width, fixed, narrow)

    def narrow(self, name: str) -> tuple | None:
        """The 8-bit range a promoted tensor converts down to (recorded as annotation ``narrow`` when applied)."""
        base = self.base[name]
        return (float(base.min[0]), float(base.max[0])) if base.bw < 16 else None

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def _parameters(enc: Encoding) -> tuple:
        """(lo, hi, scale, zero point) of one encoding, in PARAMETERS order."""
        scale, zero_point = qdq_params(enc)
        return float(enc.min[0]), float(enc.max[0]), float(scale), int(zero_point)

    def measure(self, encodings: dict, count: int | None = None) -> Measure:
        params = self._feeds(encodings)
        stats = ErrorStats()
        for sample, references in list(zip(self.samples, self.reference))[:count]:
            for reference, got in zip(references, self.session.run(self.outputs, {**sample, **params})):
                stats.update(reference, got)
        return Measure(stats.cos, stats.noise / stats.signal if stats.signal else 0.0)

    def converts(self, encodings: dict) -> int:
        """The converts insert-converts will insert: distinct (tensor, width) pairs read at another width."""
        return len({(name, encodings[writes].bw) for name, _, _, writes in self.edges
                    if encodings[writes].bw != encodings[name].bw})


@register
class Promote16Bit(Pass):
    name = "promote-16bit"
    kind = PassKind.ANNOTATING
    after = ("calibrate", "bias-correction", "propagate-encodings", "adaround", "brecq")

    @dataclass(frozen=True)
    class Options:
        target_cos: float = 0.999
        budget: float = 0.25
        samples: int = 16
        screen_samples: int = 2
        rounds: int = 3
        weight_bits: int = 8
        per_channel: bool = True

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        opts = self.options
        if not 0 < opts.target_cos <= 1:
            raise QccError(f"promote-16bit: target-cos must be in (0, 1], got {opts.target_cos}")
        if not 0 <= opts.budget <= 1:
            raise QccError(f"promote-16bit: budget must be in [0, 1], got {opts.budget}")
        if opts.samples < 1 or opts.screen_samples < 1:
            raise QccError("promote-16bit: samples and screen-samples must be at least 1")
        if has_qdq(module.graph):
            ctx.remark("graph", "already has QuantizeLinear/DequantizeLinear nodes; promote-16bit runs before insert-qdq")
            return PassResult(False)
        activations = [n for n in activation_tensors(module) if n in module.encodings and module.encodings[n].dtype == "int"]
        if not activations:
            ctx.remark("graph", "no activation encodings; run calibrate first")
            return PassResult(False)
        if ctx.calib_data is None:
            raise QccError("promote-16bit needs calibration data (--calib-data) to measure the output cosine")
        previous = module.cache.get(CACHE_KEY)
        if previous and previous["options"] == str(self) and all(
                module.encodings.get(n) is not None and module.encodings[n].bw >= 16
                for entry in previous["promoted"] for n in entry["tensors"]):
            return PassResult(False, {"cos-after": previous["cos_after"], "share-16bit": previous["share_16bit"]})
        samples = [s for _, s in zip(range(opts.samples), ctx.calib_data)]

        # Against the FP32 model as it was before any pass moved its float outputs (bias correction, AdaRound).
        sim = QdqSimulation(module, opts.weight_bits, opts.per_channel, samples, ctx.reference,
                            sixteen_bit_encodings(module, ctx.calib_data))
        encodings = dict(module.encodings)
        wide = {n for n in activations if encodings[n].bw >= 16}
        total = len(activations)
        share_of = lambda tensors: len(tensors) / total
        start = sim.measure(encodings)
        stats = {"cos-before": start.cos, "activations": total}
        if start.cos >= opts.target_cos:
            return PassResult(False, {**stats, "share-16bit": share_of(wide)})

        simulated = {name for name, _ in sim.pairs}
        widened = lambda unit: {n: sim.wide[n] for n in unit if n not in wide}
        units = [u for u in promotion_units(module, set(activations)) if not set(u) <= wide and set(u) <= simulated]
        best_case = sim.measure({**encodings, **{n: e for u in units for n, e in widened(u).items()}})
        cos, evaluations, chosen, removed = start.cos, 2, [], {}
        budget_full = False
        for round_index in range(opts.rounds):
            remaining = [u for u in units if not set(u) <= wide]
            round_baseline = sim.measure(encodings, opts.screen_samples).error
            round_cost = {}
            with Progress(len(remaining), f"promote-16bit: ranking, round {round_index + 1}") as bar:
                for u in remaining:
                    round_cost[tuple(u)] = round_baseline - sim.measure({**encodings, **widened(u)}, opts.screen_samples).error
                    bar.advance()
            evaluations += len(remaining) + 1
            picked, count, measured = self._choose(sim, encodings, wide, remaining, round_cost, widened, share_of, cos)
            evaluations += len(measured) - 1  # prefix 0 is the state already measured
            budget_full = budget_full or count == len(picked) < sum(1 for c in round_cost.values() if c > 0)
            if not count:
                break
            removed.update({tuple(u): round_cost[tuple(u)] / round_baseline for u in picked[:count]})
            chosen += picked[:count]
            encodings = {**encodings, **{n: e for u in picked[:count] for n, e in widened(u).items()}}
            wide = wide.union(*picked[:count])
            cos = measured[count]
            if cos >= opts.target_cos or budget_full:
                break
        count = len(chosen)
        if cos < opts.target_cos:
            limits = [f"even with every activation at 16 bits it is {best_case.cos:.6f}: the weights limit it "
                      f"(per-channel, bias correction, AdaRound)"] if best_case.cos < opts.target_cos else []
            if budget_full:
                limits.append(f"the budget ({opts.budget:g}) holds no more")
            ctx.remark("graph", f"output cosine {cos:.6f} < {opts.target_cos:g} with {share_of(wide):.1%} of the "
                                f"activations at 16 bits; {'; '.join(limits) or 'no unit helps further'}")
        if not count:
            return PassResult(False, {**stats, "share-16bit": share_of(wide)})
        promoted = [{"tensors": u, "output_error_share": removed[tuple(u)]} for u in chosen]
        for unit in chosen:  # remarks reach the compile report
            ctx.remark(unit[0], f"to 16 bits{' with ' + ', '.join(unit[1:]) if len(unit) > 1 else ''}: "
                                f"alone it removes {removed[tuple(unit)]:.1%} of the output error")
        changed = [name for name, enc in encodings.items() if enc is not module.encodings.get(name)]
        for name in changed:
            old = module.encodings[name]
            module.annotate(name, act_bits=16, **({"narrow": sim.narrow(name)} if old.bw < 16 and not old.symmetric else {}))
            module.encodings[name] = encodings[name]
        module.encodings.update(constant_encodings(module, wide))
        module.cache[CACHE_KEY] = {"options": str(self), "target_cos": opts.target_cos, "budget": opts.budget, "cos_before": start.cos,
                                   "cos_all_16bit": best_case.cos, "cos_after": cos, "share_16bit": share_of(wide),
                                   "converts": sim.converts(encodings), "promoted": promoted}
        return PassResult(True, {**stats, "cos-after": cos, "cos-all-16bit": best_case.cos, "promoted": len(changed),
                                 "share-16bit": share_of(wide), "converts": sim.converts(encodings),
                                 "evaluations": evaluations})

    def _choose(self, sim, encodings, wide, units, cost, widened, share_of, cos_now) -> tuple[list, int, dict]:
        """The costliest units first, as many as the budget holds; prefixes of 1, 2, 4, ... units are measured
        until one reaches the target, then bisection finds the shortest; short of the target, the best prefix.
        Returns (the ordered units, how many to promote, cosine per measured prefix length)."""
        target = self.options.target_cos
        helpful = sorted((u for u in units if cost[tuple(u)] > 0), key=lambda u: -cost[tuple(u)])
        chosen = []
        for unit in helpful:
            if share_of(wide.union(*chosen, unit)) <= self.options.budget:
                chosen.append(unit)
        prefix = lambda k: {**encodings, **{n: e for u in chosen[:k] for n, e in widened(u).items()}}
        measured = {0: cos_now}
        low, high = 0, None
        for size in sorted({min(2 ** i, len(chosen)) for i in range(len(chosen).bit_length() + 1)} - {0}):
            measured[size] = sim.measure(prefix(size)).cos
            if measured[size] >= target:
                high = size
                break
            low = size
        if high is None:
            return chosen, max(measured, key=lambda k: (measured[k], -k)), measured
        while high - low > 1:
            middle = (low + high) // 2
            measured[middle] = sim.measure(prefix(middle)).cos
            low, high = (middle, high) if measured[middle] < target else (low, middle)
        return chosen, high, measured
