"""The one quantization simulation (design.md decision 8): the QDQ model qcc would write, run on onnxruntime.

``QuantSim`` builds, from a module and the compile's config, exactly the model the rest of the pipeline
writes: propagate-encodings' rules with the pipeline's own options (``of_pipeline``), then insert-qdq's
lowering (compiler.qdq), the same code the passes run. Sessions run on onnxruntime's CPU provider with
graph optimisations off (dequantize, then the float op: compiler.runtime), and may expose any tensor.
Bias correction and brecq simulate through it; promote-16bit through ``MixedPrecisionSim``, the same
lowering with each activation's width (and insert-converts' converts) chosen at run time.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from compiler.config import QuantConfig
from compiler.encoding import Encoding, fixed_ranges, qdq_params
from compiler.ir import Module
from compiler.layer_analysis import ErrorStats, GraphIndex, Reference, activation_quantizers, is_dq, is_q
from compiler.propagation import propagate_encodings
from compiler.qdq import INT32_MAX, MS_DOMAIN, convert_encoding, lowered_copy, rebiased, rebit, requantized_constant
from compiler.runtime import make_session

# Run-time quantizer parameters of MixedPrecisionSim, one vector entry per quantizer: name and type.
PARAMETERS = (("lo", onnx.TensorProto.FLOAT), ("hi", onnx.TensorProto.FLOAT), ("scale", onnx.TensorProto.FLOAT),
              ("zero", onnx.TensorProto.UINT16))


def pipeline_propagation(pipeline) -> bool | None:
    """propagate-encodings' ``fuse-activations`` in ``pipeline``, None when the pipeline does not propagate. A pass
    run outside a pipeline (None) is simulated as the targets' pipelines run it: propagating, with fusion."""
    if pipeline is None:
        return True
    propagation = pipeline.find("propagate-encodings")
    return None if propagation is None else propagation.options.fuse_activations


class QuantSim:
    """``module`` as the rest of the pipeline would write it now: ``propagated`` (its encodings after
    propagate-encodings, when the pipeline has it) and ``qdq`` (the QDQ model insert-qdq writes from them)."""

    def __init__(self, module: Module, config: QuantConfig, fuse_activations: bool | None = True):
        self.config = config
        self.propagated = module.clone()
        if fuse_activations is not None:
            propagate_encodings(self.propagated, fuse_activations)
        self.qdq = lowered_copy(self.propagated, config)

    @classmethod
    def of_pipeline(cls, module: Module, ctx) -> "QuantSim":
        """The simulation a pass inside ``ctx.pipeline`` needs: that pipeline's config and options."""
        return cls(module, ctx.config, pipeline_propagation(ctx.pipeline))

    def session(self, extra_outputs: list[str] | None = None):
        return make_session(self.qdq, extra_outputs=extra_outputs)


@dataclass
class Measure:
    cos: float    # mean over samples and outputs
    error: float  # Σ ||q - f||² / Σ ||f||² over samples and outputs
    cosines: tuple = ()  # per sample and output, in order


def dequantized(values: list, axis: int = 1) -> np.ndarray:
    """What DequantizeLinear computes from constant (x, scale[, zero point]), bit for bit: (x - zero) * scale, the
    difference as float32 times the float32 scale, per ``axis`` when the scale is a vector."""
    stored, scale = np.asarray(values[0]), np.asarray(values[1], dtype=np.float32)
    zero = np.asarray(values[2]).astype(np.int64) if len(values) > 2 else np.zeros(scale.shape, np.int64)
    if scale.ndim == 1 and stored.ndim > 1:
        shape = [1] * stored.ndim
        shape[axis % stored.ndim] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return (stored.astype(np.int64) - zero).astype(np.float32) * scale


def _axis(dq: onnx.NodeProto) -> int:
    return next((helper.get_attribute_value(a) for a in dq.attribute if a.name == "axis"), 1)


class MixedPrecisionSim:
    """The QDQ model of a module with each activation's width chosen at run time: its quantizers and the
    converts insert-converts would add, parameterised, so one session measures any choice of widths."""

    def __init__(self, module: Module, config: QuantConfig, samples: list[dict],
                 reference: Module | None = None, sixteen_bit: dict | None = None, wide_weights: frozenset = frozenset(),
                 wide_biases: dict | None = None):
        """``reference``: the FP32 model to compare with (default: ``module``'s float graph);
        ``sixteen_bit``: each activation's encoding when promoted (default: its range re-derived at 16 bits);
        ``wide_weights``: the weights that are 16-bit where their layer's output is (promote-16bit's wide layers);
        ``wide_biases``: those layers' biases when their weights are 16-bit (the values before bias correction)."""
        self.fixed = fixed_ranges(module)
        self.base = dict(module.encodings)
        self.wide = {name: enc if enc.bw >= 16 else (sixteen_bit or {}).get(name) or rebit(enc, 16, self.fixed.get(name))
                     for name, enc in self.base.items() if enc.dtype == "int" and not enc.symmetric}
        self.qdq_model = lowered_copy(module, config).to_onnx()
        # The same with every unsigned activation and activation-like constant at 16 bits: biases (scale
        # s_in * s_w) follow their input, constants are quantized from their float values.
        self.wide_model = lowered_copy(module, config, self.wide, wide_weights, wide_biases).to_onnx()
        # A layer whose input and output widths differ reads its weight at its output's width: the 16-bit weight
        # (fitted to the 8-bit input's bias scale) behind a convert up, the 8-bit one behind a convert down.
        self.up_model = lowered_copy(module, config, None, wide_weights, wide_biases).to_onnx() if wide_weights else self.qdq_model
        self.down_model = lowered_copy(module, config, self.wide).to_onnx() if wide_weights else self.wide_model
        self.float_model = (reference or module).clone().to_onnx()
        g = GraphIndex(self.qdq_model)
        # (tensor, its DequantizeLinear): insert-qdq's Q reads the tensor, or for a graph output its DQ writes it.
        # Unsigned activations only: their 8- and 16-bit grids both fit the uint16 container.
        self.pairs = []
        for q, dq in activation_quantizers(g):
            output = g.nodes[dq].output[0]
            name = output if output in g.outputs else g.nodes[q].input[0]
            if name in module.encodings and not module.encodings[name].symmetric:
                self.pairs.append((name, output))
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
        self.reference = self._references(samples)

    def __getstate__(self) -> dict:
        """Pickled (a Ray task's copy) without the onnxruntime session, which the copy builds again."""
        return {key: value for key, value in self.__dict__.items() if key != "session"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.session = make_session(self._parameterised())

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
        # The switched constants' own DequantizeLinear nodes are read no more: onnxruntime would still run them.
        read = {x for n in nodes for x in n.input} | {o.name for o in model.graph.output}
        nodes = [n for n in nodes if any(o in read for o in n.output)]
        read = {x for n in nodes for x in n.input}
        kept = [t for t in model.graph.initializer if t.name in read]
        del model.graph.node[:], model.graph.initializer[:]
        model.graph.node.extend(nodes)
        model.graph.initializer.extend(kept)
        return model

    def _switch_constants(self, model: onnx.ModelProto, g: GraphIndex, replace: dict, head: list) -> None:
        """Constants whose quantization follows a width are dequantized every way once, here, and picked by the
        widths at run time (``_pick``), so any choice is bit-exact. An int32 bias follows its node's input, as
        insert-qdq derives it (from the tensor's own width) and insert-converts re-derives it (for the node's
        width). An activation-like constant is 16-bit (from its float value) when a node reading it computes at
        16 bits (``constant_encodings``), and insert-converts rounds it to 8 bits for a node that does not."""
        wide = GraphIndex(self.wide_model)
        up = GraphIndex(self.up_model) if self.up_model is not self.qdq_model else g
        down = GraphIndex(self.down_model) if self.down_model is not self.wide_model else wide
        pair_of = {dq_output: i for i, (_, dq_output) in enumerate(self.pairs)}
        flag = {name: f"qcc_act{i}_wide" for i, (name, _) in enumerate(self.pairs)}
        writes = {user: w for _, user, _, w in self.edges}
        # Each layer's weight as the lowerings name it: _pick rewires the layer's inputs as it goes.
        weight_of = {i: node.input[1] for i, node in enumerate(g.nodes) if len(node.input) > 1}
        for node in g.nodes:
            if not is_dq(node) or not g.is_constant(node.input[0]) or node.output[0] not in wide.producer:
                continue
            base = [g.constant(name) for name in node.input]
            other = wide.nodes[wide.producer[node.output[0]]]
            widened = [wide.constant(name) for name in other.input]
            variants = [(source, source.nodes[source.producer[node.output[0]]]) for source in (up, down)]
            # The up and down lowerings are the 8- and 16-bit ones themselves unless some weights are wide.
            others = [(source, dq) for source, dq in variants if source is not g and source is not wide]
            if all(v is not None and np.array_equal(v, b) for v, b in zip(widened, base)) and all(
                    np.array_equal(source.constant(n), b) for source, dq in others for n, b in zip(dq.input, base)):
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
                if base[0].dtype == np.int32:
                    self._bias(model, replace, (g, node), (wide, other), variants, consumer, user, index, tensor, flag,
                               writes.get(user), weight_of[user])
                else:  # a weight: 16-bit on a wide layer, or raised by insert-qdq for its bias
                    self._weight(model, replace, (g, node), (wide, other), variants, consumer, user, index, tensor, flag,
                                 writes.get(user))

    def _constant(self, model, replace, g, node, other, widened, users, reader_flags, flag_of, head) -> None:
        """By (any reader wide, this reader wide): the 16-bit constant, or it rounded to 8 bits; the constant as
        stored when no reader is wide."""
        if not reader_flags:
            return
        tag = f"qcc_const_{node.output[0]}"
        any_wide = reader_flags[0]
        for k, other_flag in enumerate(reader_flags[1:]):
            head.append(helper.make_node("Or", [any_wide, other_flag], [f"{tag}_any{k}"]))
            any_wide = f"{tag}_any{k}"
        sixteen = dequantized(widened, _axis(other))
        stored, enc = requantized_constant(*widened, 8)
        eight = dequantized([stored, *qdq_params(enc)], _axis(other))
        as_stored = dequantized([g.constant(name) for name in node.input], _axis(node))
        for user in users:
            consumer = g.nodes[user]
            index = list(consumer.input).index(node.output[0])
            user_tag = f"{tag}_{user}_{index}"
            if user in flag_of:  # (any, this): (0, 1) cannot happen, ``any`` includes this reader's flag
                self._pick(model, replace, consumer, user, index, [any_wide, flag_of[user]],
                           [as_stored, as_stored, eight, sixteen], user_tag)
            else:
                self._pick(model, replace, consumer, user, index, [any_wide], [as_stored, sixteen], user_tag)

    def _bias(self, model, replace, base, wide, variants, consumer, user, index, tensor, flag, writes, weight_name) -> None:
        """By (T wide, layer wide): the bias, the up lowering's bias rebiased for the convert up, the down
        lowering's rebiased for the convert down, the wide bias. ``base``, ``wide``: (GraphIndex, the bias's
        DequantizeLinear) of the 8- and 16-bit lowerings; ``variants``: the same in the up and down lowerings
        (the layer's weight at its output's width)."""
        tag = f"qcc_bias_{user}_{index}"
        values = {key: dequantized([source.constant(n) for n in dq.input], _axis(dq))
                  for key, (source, dq) in (("base", base), ("wide", wide))}
        if writes is None:  # no quantized output: insert-converts leaves the layer alone
            self._pick(model, replace, consumer, user, index, [flag[tensor]], [values["base"], values["wide"]], tag)
            return
        # The converts' encodings, as _feeds and insert-converts derive them: the 8-bit range up, the 16-bit one down.
        base_enc, fixed = self.base[tensor], self.fixed.get(tensor)
        up = base_enc if base_enc.bw >= 16 else rebit(base_enc, 16, fixed)
        down = convert_encoding(self.wide[tensor], 8, fixed, self.narrow(tensor))
        for key, (source, dq), enc in zip(("up", "down"), variants, (up, down)):
            stored, scale, zero = (source.constant(n) for n in dq.input)
            weight = source.nodes[source.producer[weight_name]] if weight_name in source.producer else None
            if weight is None or not is_dq(weight) or source.constant(weight.input[1]) is None:
                return
            rebiased_values, new_scale = rebiased(stored, scale, source.constant(weight.input[1]), enc.scale[0])
            values[key] = dequantized([rebiased_values, new_scale, zero], _axis(dq))
        self._pick(model, replace, consumer, user, index, [flag[tensor], flag[writes]],
                   [values["base"], values["up"], values["down"], values["wide"]], tag)

    def _weight(self, model, replace, base, wide, variants, consumer, user, index, tensor, flag, writes) -> None:
        """By (T wide, layer wide): the weight each lowering stores (a scale insert-qdq raised for the bias's input
        scale, the width of a wide layer); by T's width alone when the layer's width does not choose it."""
        tag = f"qcc_weight_{user}_{index}"
        keyed = (("base", base), ("wide", wide), *zip(("up", "down"), variants))
        stored = {key: [source.constant(n) for n in dq.input] for key, (source, dq) in keyed}
        axis = {key: _axis(dq) for key, (_, dq) in keyed}
        same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(stored[a], stored[b]))
        by_input_only = writes is None or (same("up", "base") and same("down", "wide"))
        keys, flags = (("base", "wide"), [flag[tensor]]) if by_input_only else \
            (("base", "up", "down", "wide"), [flag[tensor], flag[writes]])
        self._pick(model, replace, consumer, user, index, flags, [dequantized(stored[k], axis[k]) for k in keys], tag)

    @staticmethod
    def _pick(model: onnx.ModelProto, replace: dict, consumer, user: int, index: int, flags: list[str],
              values: list[np.ndarray], tag: str) -> None:
        """``consumer`` reads, at ``index``, values[k] for k the binary number the boolean ``flags`` spell (the first
        the highest bit): one Gather from the values stacked, which copies the chosen one. (Where on a scalar
        flag went element by element through every variant, and each variant was dequantized on every run: on
        det that was half of a run.)"""
        model.graph.initializer.append(numpy_helper.from_array(np.stack(values), f"{tag}_choices"))
        nodes, number = [], None
        for k, flag in enumerate(flags):
            bit = f"{tag}_bit{k}"
            nodes.append(helper.make_node("Cast", [flag], [bit], to=onnx.TensorProto.INT64))
            if number is not None:
                nodes += [helper.make_node("Add", [number, number], [f"{tag}_twice{k}"]),
                          helper.make_node("Add", [f"{tag}_twice{k}", bit], [f"{tag}_number{k}"])]
                bit = f"{tag}_number{k}"
            number = bit
        nodes.append(helper.make_node("Gather", [f"{tag}_choices", number], [f"{tag}_pick"], axis=0))
        replace.setdefault(user, [consumer])[-1:-1] = nodes
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

    def measure(self, encodings: dict, count: int | None = None, start: int = 0) -> Measure:
        """Output cosine and relative error against FP32 with ``encodings``, over ``count`` samples (default: all)
        from sample ``start`` on."""
        end = None if count is None else start + count
        return self._measure(encodings, list(zip(self.samples, self.reference))[start:end])

    def compare_on(self, samples: list[dict], *states: dict) -> list[Measure]:
        """``measure`` of each of ``states`` (encodings) on ``samples`` outside the simulation's own, their FP32
        outputs computed once here: a comparison on samples no choice was fitted on."""
        pairs = list(zip(samples, self._references(samples)))
        return [self._measure(encodings, pairs) for encodings in states]

    def _references(self, samples: list[dict]) -> list[list[Reference]]:
        """The FP32 outputs of each of ``samples``."""
        reference = make_session(self.float_model)
        return [[Reference(v) for v in reference.run(self.outputs, s)] for s in samples]

    def _measure(self, encodings: dict, pairs: list) -> Measure:
        params = self._feeds(encodings)
        stats = ErrorStats()
        for sample, references in pairs:
            for reference, got in zip(references, self.session.run(self.outputs, {**sample, **params})):
                stats.update(reference, got)
        return Measure(stats.cos, stats.noise / stats.signal if stats.signal else 0.0, tuple(stats.cosines))

    def saturating_up_converts(self) -> list[tuple[str, str]]:
        """(tensor, tensor its reader writes) for each 8-bit tensor whose reader's int32 bias would not fit at the
        16-bit input scale a convert up gives it: s_in * s_w shrinks about 257 times, and a bias past 2^31 steps
        saturates (16-bit weights on det's first Conv: biases clipped to +-2^31, the model at cosine 0.96 where
        this simulation said 0.9996). promote-16bit gives such a pair one width, so no convert up reaches it."""
        g, lowering = GraphIndex(self.qdq_model), GraphIndex(self.up_model)  # a wide layer reads the up lowering's
        pairs = []
        for name, user, _, writes in self.edges:
            base = self.base[name]
            consumer = g.nodes[user]
            if base.bw >= 16 or len(consumer.input) < 3 or not all(x in lowering.producer for x in consumer.input[1:3]):
                continue
            weight_dq, bias_dq = (lowering.nodes[lowering.producer[x]] for x in consumer.input[1:3])
            stored, scale = (lowering.constant(x) for x in bias_dq.input[:2])
            weight_scale = lowering.constant(weight_dq.input[1]) if is_dq(weight_dq) else None
            if not is_dq(bias_dq) or stored is None or scale is None or weight_scale is None or stored.dtype != np.int32:
                continue
            up = self._convert(base, 16, self.fixed.get(name), None)
            values = stored.astype(np.float64) * np.asarray(scale, dtype=np.float64)
            steps = np.abs(values) / (up.scale[0] * np.asarray(weight_scale, dtype=np.float64))
            if np.max(steps, initial=0.0) > INT32_MAX:
                pairs.append((name, writes))
        return pairs

    def conversions(self, encodings: dict) -> set[tuple[str, int]]:
        """The converts insert-converts will insert: distinct (tensor, width) pairs read at another width."""
        return {(name, encodings[writes].bw) for name, _, _, writes in self.edges
                if encodings[writes].bw != encodings[name].bw}
