"""Cross-layer equalization: rescale the channels between two convolutions so their weight ranges match.

Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias Correction", 2019.
For Conv1 -> [Add(bias)] -> act -> Conv2 (Gemm and MatMul with constant weights too, as in a
squeeze-excite block written with fully-connected layers), where act is positively homogeneous
(Relu, LeakyRelu, PRelu, or no activation: act(x / s) = act(x) / s for s > 0), channel i between
the two layers can be divided by s_i in Conv1 and multiplied back in Conv2 without changing the
result:

    W1[i] /= s_i    b1[i] /= s_i    W2[:, i] *= s_i        s_i = sqrt(r1_i * r2_i) / r2_i

with r1_i = max|W1[i, ...]| (output channel i of Conv1) and r2_i = max|W2[:, i, ...]| (input
channel i of Conv2; for a grouped or depthwise Conv2, the weights of the group that reads i).
Both ranges become sqrt(r1_i * r2_i), which maximises the per-tensor quantization precision of
the pair. Chains (Conv -> DWConv -> Conv, as in MobileNet) are swept pair by pair until no scale
moves by more than 0.1 % (or ``iterations`` sweeps); a second run finds nothing to do.

    %a = Conv(%x, @w1, @b1)                        %a = Conv(%x, @w1', @b1')     w1' = w1 / s, b1' = b1 / s
    %r = Relu(%a)                          ->      %r = Relu(%a)
    %y = Conv(%r, @w2)                             %y = Conv(%r, @w2')           w2' = w2 * s (input axis)

paddle2onnx writes the bias as ``Add(conv, c)`` after the Conv; that constant is scaled too.

High-bias absorption (``absorb-bias=true``, off by default; needs calibration data): where every
calibration sample keeps pre-activation channel i of a Relu/LeakyRelu/PRelu pair above c_i > 0,
the constant c_i moves into the next layer, shrinking the activation's range (its quantization step):

    b1[i] -= c_i    b2[o] += sum_{i,k} W2[o, i, k] * c_i        c_i = min over the data of a[:, i]

act(a - c) = act(a) - c wherever a >= c. That holds on every calibration sample, not on every
input (on held-out det images the outputs moved by 31 % of their range, docs/measurements.md), so
with absorb-bias the pass is not float-preserving (--verify does not check it; the paper's 3-sigma
rule from batch-norm statistics is approximate the same way). Conv2 must have no padding (a padded
border would see 0, not c). A BatchNormalization between the layers declines the pair (run fold-bn
first).

Relu6 = Clip(0, 6) and HardSwish are not homogeneous: Clip(x / s, 0, 6) != Clip(x, 0, 6) / s
once x > 6 / s. Such pairs are declined with a remark unless ``allow-clip=true``, which equalizes
them anyway and thereby CHANGES the float result (not float-preserving either: HardSwish(x / s) * s
is far from HardSwish(x); docs/measurements.md).

Stats: ``pairs-equalized``, ``sweeps``, ``bias-absorbed`` (channels); before and after, the
per-channel weight-range ratio max(r1_i, r2_i) / min(r1_i, r2_i) (mean and max over the live
channels of every pair; 1 once equalized) and the paper's per-tensor precision of a pair,
mean_i (r1_i / R1) * (r2_i / R2) with R = the layer's largest channel range (the quantity the
scaling maximises; averaged over pairs).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from compiler.ir import Module, QccError, const_value
from compiler.linear import LinearLayer, bias_add, bias_site, linear_layer, set_input_const, uses
from compiler.pass_manager import Pass, PassContext, PassKind, PassResult, register
from compiler.patterns import has_single_consumer
from compiler.runtime import make_session

LAYERS = frozenset({"Conv", "Gemm", "MatMul"})
HOMOGENEOUS = frozenset({"Relu", "LeakyRelu", "PRelu"})
CLIPPING = frozenset({"Clip", "HardSwish"})
TOLERANCE = 1e-3  # |log s| below this counts as converged
ABSORB_FRACTION = 1e-3  # absorb c_i only when it is this fraction of the channel's observed span
DEAD_FRACTION = 1e-6  # a channel whose range is below this fraction of its layer's is dead: left unscaled


@dataclass
class Link:
    first: LinearLayer
    second: LinearLayer
    act: object  # the activation node, or None for a direct Conv -> Conv
    pre_activation: object  # the tensor the activation reads (Conv1's output or its bias Add's)


def _output_ranges(layer: LinearLayer) -> np.ndarray:
    matrix = layer.to_matrix(layer.weight)
    return np.abs(matrix).reshape(layer.out_channels, -1).max(axis=1)


def _input_ranges(layer: LinearLayer) -> np.ndarray:
    return np.abs(layer.input_channel_view(layer.weight)).max(axis=(1, 3)).reshape(-1)


def _alive(ranges: np.ndarray) -> np.ndarray:
    return ranges > DEAD_FRACTION * ranges.max() if ranges.size else np.zeros(0, dtype=bool)


@register
class CrossLayerEqualization(Pass):
    name = "cle"
    kind = PassKind.FLOAT_PRESERVING

    @dataclass(frozen=True)
    class Options:
        iterations: int = 100
        absorb_bias: bool = False
        allow_clip: bool = False

    def __init__(self, options=None):
        super().__init__(options)
        if self.options.allow_clip or self.options.absorb_bias:
            # Both change the float result (beyond the calibration data): the manager must not verify them as exact.
            self.kind = PassKind.ANNOTATING

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        if self.options.iterations < 1:
            raise QccError(f"cle: iterations must be at least 1, got {self.options.iterations}")
        graph = module.graph
        links = self._links(graph, ctx)
        if not links:
            return PassResult(False, {"pairs-equalized": 0})
        ratios_before, precision_before = self._range_stats(links)
        equalized, sweeps = set(), 0
        # link index -> its two weight arrays when it last found nothing to move: the scales are a function of
        # the weights alone, so a link is re-examined only once a neighbour has replaced one of them.
        settled: dict[int, tuple] = {}
        for sweeps in range(1, self.options.iterations + 1):
            moved = False
            for index, link in enumerate(links):
                weights = (link.first.weight, link.second.weight)
                if index in settled and all(old is new for old, new in zip(settled[index], weights)):
                    continue
                if self._equalize(graph, link):
                    equalized.add(index)
                    settled.pop(index, None)
                    moved = True
                else:
                    settled[index] = weights
            if not moved:
                break
        else:
            ctx.remark("graph", f"equalization still moving after {self.options.iterations} sweeps")
        absorbed = self._absorb_biases(module, links, ctx) if self.options.absorb_bias else 0
        stats = {"pairs-equalized": len(equalized), "sweeps": sweeps, "bias-absorbed": absorbed}
        if equalized:
            ratios_after, precision_after = self._range_stats(links)
            stats.update({"range-ratio-mean-before": float(ratios_before.mean()), "range-ratio-mean-after": float(ratios_after.mean()),
                          "range-ratio-max-before": float(ratios_before.max()), "range-ratio-max-after": float(ratios_after.max()),
                          "precision-before": precision_before, "precision-after": precision_after})
        return PassResult(bool(equalized) or absorbed > 0, stats)

    # --- matching -------------------------------------------------------------------------------

    def _links(self, graph, ctx: PassContext) -> list[Link]:
        links = []
        self.blocked_by_bn = 0
        for node in graph.nodes:
            if node.op not in LAYERS:
                continue
            first, _ = linear_layer(node)
            if first is None:
                continue
            link = self._follow(graph, first, ctx)
            if link is not None:
                links.append(link)
        if self.blocked_by_bn:
            ctx.remark("graph", f"{self.blocked_by_bn} convolution(s) feed a BatchNormalization, not equalized: run fold-bn before cle")
        return links

    def _follow(self, graph, first: LinearLayer, ctx: PassContext) -> Link | None:
        """The Link starting at ``first``, or None (with a remark when a near-match is declined)."""
        tensor = first.node.outputs[0]
        if not has_single_consumer(graph, tensor):
            return None
        found = bias_add(graph, first)
        if found is not None:
            tensor = found[0].outputs[0]
            if not has_single_consumer(graph, tensor):
                return None
        pre_activation = tensor
        user = tensor.outputs[0]
        act = None
        if user.op in HOMOGENEOUS or user.op in CLIPPING:
            if user.op in CLIPPING and not self.options.allow_clip:
                nxt = user.outputs[0].outputs
                if len(nxt) == 1 and nxt[0].op in LAYERS:
                    ctx.remark(user, "not positively homogeneous, pair not equalized "
                                     "(allow-clip=true equalizes it and changes the float result)")
                return None
            if user.op == "PRelu" and const_value(user.inputs[1]) is None:
                return None
            act = user
            tensor = user.outputs[0]
            if not has_single_consumer(graph, tensor):
                return None
            user = tensor.outputs[0]
        if user.op == "BatchNormalization":
            self.blocked_by_bn += 1
            return None
        if user.op not in LAYERS or user.inputs[0] is not tensor:
            return None
        second, why = linear_layer(user)
        if second is None:
            ctx.remark(user, f"not equalized: {why}")
            return None
        if second.in_channels != first.out_channels:
            return None
        for layer in (first, second):
            if uses(graph, layer.weight_tensor) != 1:
                ctx.remark(layer.node, "weight shared with another node: pair not equalized")
                return None
        return Link(first, second, act, pre_activation)

    # --- equalization ---------------------------------------------------------------------------

    def _equalize(self, graph, link: Link) -> bool:
        r1, r2 = _output_ranges(link.first), _input_ranges(link.second)
        alive = _alive(r1) & _alive(r2)
        scale = np.ones_like(r1, dtype=np.float64)
        scale[alive] = np.sqrt(r1[alive] / r2[alive])
        if np.abs(np.log(scale)).max() <= TOLERANCE:
            return False
        self._scale_channels(graph, link, scale)
        return True

    @staticmethod
    def _scale_channels(graph, link: Link, scale: np.ndarray) -> None:
        """Divide link channel i by scale[i] in the first layer, multiply it back in the second."""
        first, second = link.first, link.second
        w1 = first.to_matrix(first.weight.astype(np.float64))
        _set_weight(graph, first, first.from_matrix(w1 / scale.reshape(w1.shape[0], w1.shape[1], 1)))
        site = bias_site(graph, first)
        if site is not None and _bias_present(site):
            site.write(graph, site.read() / scale)
        view = second.input_channel_view(second.weight.astype(np.float64))
        scaled = view * scale.reshape(second.groups, 1, view.shape[2], 1)
        _set_weight(graph, second, second.from_matrix(scaled))

    @staticmethod
    def _range_stats(links: list[Link]) -> tuple[np.ndarray, float]:
        """Per-channel range ratios max(r1, r2) / min(r1, r2) of every live channel, and the mean precision."""
        ratios, precisions = [], []
        for link in links:
            r1, r2 = _output_ranges(link.first), _input_ranges(link.second)
            alive = _alive(r1) & _alive(r2)
            ratios.append(np.maximum(r1, r2)[alive] / np.minimum(r1, r2)[alive])
            precisions.append(float(np.mean((r1 / r1.max()) * (r2 / r2.max()))) if r1.max() > 0 and r2.max() > 0 else 0.0)
        return np.concatenate(ratios), float(np.mean(precisions))

    # --- high-bias absorption -------------------------------------------------------------------

    def _absorb_biases(self, module: Module, links: list[Link], ctx: PassContext) -> int:
        graph = module.graph
        candidates = []
        for link in links:
            if link.act is None or link.act.op not in HOMOGENEOUS:
                continue
            if not link.first.is_conv and len(link.pre_activation.shape or ()) != 2:
                continue  # per-channel statistics below read axis 1: NCHW or [N, C] only
            if link.second.has_padding():
                ctx.remark(link.second.node, "bias not absorbed: the layer pads its input with zeros")
                continue
            if bias_site(graph, link.first) is None or bias_site(graph, link.second) is None:
                continue
            candidates.append(link)
        if not candidates:
            return 0
        if ctx.calib_data is None:
            ctx.remark("graph", "bias absorption needs calibration data (per-channel pre-activation minima); skipped")
            return 0
        lows, spans = _channel_extremes(module, ctx.calib_data, [link.pre_activation.name for link in candidates])
        absorbed, tensor_names = 0, set(graph.tensors())
        for link in candidates:
            low, span = lows[link.pre_activation.name], spans[link.pre_activation.name]
            shift = np.where(low > ABSORB_FRACTION * np.maximum(span, 1e-12), low, 0.0)
            if not shift.any():
                continue
            first_site, second_site = bias_site(graph, link.first), bias_site(graph, link.second)
            first_site.write(graph, first_site.read() - shift, tensor_names)
            second = link.second
            taps = second.input_channel_view(second.weight).shape[3]
            column = np.repeat(shift, taps).reshape(second.groups, -1)
            added = np.einsum("gok,gk->go", second.to_matrix(second.weight).astype(np.float64), column).reshape(-1)
            second_site.write(graph, second_site.read() + added, tensor_names)
            absorbed += int(np.count_nonzero(shift))
        return absorbed


def _bias_present(site) -> bool:
    return site.index < len(site.node.inputs) and bool(site.node.inputs[site.index].name)


def _set_weight(graph, layer: LinearLayer, values: np.ndarray) -> None:
    set_input_const(graph, layer.node, 1, values.astype(layer.weight.dtype))


def _channel_extremes(module: Module, data, names: list[str]) -> tuple[dict, dict]:
    """Per-channel (axis 1) minimum and max - min of each tensor over every sample of ``data``."""
    session = make_session(module, extra_outputs=names)
    lows, highs = {}, {}
    for sample in data:
        for name, value in zip(names, session.run(names, sample)):
            axes = tuple(i for i in range(value.ndim) if i != 1)
            low, high = value.min(axis=axes).astype(np.float64), value.max(axis=axes).astype(np.float64)
            lows[name] = np.minimum(lows[name], low) if name in lows else low
            highs[name] = np.maximum(highs[name], high) if name in highs else high
    if not lows:
        raise QccError("cle: calibration data is empty")
    return lows, {name: highs[name] - lows[name] for name in names}
