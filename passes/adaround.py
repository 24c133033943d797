"""AdaRound: learn, layer by layer, whether each weight rounds up or down (Nagel et al. 2020, "Up or Down?").

Rounding every weight to nearest minimises each weight's error, not the layer's output error.
AdaRound chooses floor or ceil per weight to minimise the output error on calibration data:

    W~ = s * clip(floor(W / s) + h(V), qmin, qmax)          h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)
    min_V  sum_o E_x[((W~ - W) x)_o^2]  +  lambda * sum (1 - |2 h(V) - 1|^beta)

with zeta = 1.1, gamma = -0.1 (rectified sigmoid), V initialised so that h(V) equals the
fractional part of W / s (round-to-nearest after hardening), no regulariser for the first 20 %
of the iterations, then beta annealed linearly from 20 to 2 so h is driven to 0 or 1; Adam on V.
The result rounds up where V >= 0. x is the layer's FP32 input on ctx.calib_data.

The quantized model feeds the layer x + n, where n is the rounding noise of the input's own
encoding. When calibrate ran first (``act-noise``, the default), that encoding is in
module.encodings and the objective is the expected error with the noise, E[(W~ (x + n) - W x)^2]
= the term above + sigma^2 |W~|^2 with sigma^2 = step^2 / 12: without it the learned rounding
may trade error along directions x hardly varies in, which the noise then excites. Order:
calibrate, adaround, propagate-encodings, insert-qdq.

The reconstruction term is quadratic in W~, so only the Gram matrix of the input patches is
kept: E[(D x)^2] = D G D^T with G = E[x x^T] per group ([g, K, K]; Conv inputs as im2col
patches, compiler.linear). One onnxruntime pass over at most ``samples`` samples fills every
layer's G from at most ``positions`` randomly chosen output positions per sample (seeded), so
memory is bounded by one sample's activations plus the Gram matrices, and each iteration costs
O(O * K^2) whatever the data size. A layer whose learned rounding does not beat round-to-nearest
on that objective keeps round-to-nearest.

The learned weights are written back exactly on the quantization grid (W = s * n, n integer),
and the encoding is recorded in module.encodings[weight], which insert-qdq uses as is (and
bias-correction sees no rounding error left): quantizing them again is exact. s is insert-qdq's
scale (compiler.encoding.weight_encoding with ``weight-bits``, per channel unless
``per-channel=false``; MatMul per tensor). A weight that already has an encoding is left alone,
so a second run changes nothing. Shared weights, ConvTranspose and non-constant weights are
declined with a remark.

Kind: ANNOTATING. The float weights change on purpose (they become their quantized values).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from compiler.encoding import Encoding, weight_encoding
from compiler.ir import Module, QccError, const_value
from compiler.linear import LinearLayer, linear_layer, set_input_const, uses
from compiler.pass_manager import Pass, PassContext, PassKind, PassResult, register
from compiler.progress import Progress
from compiler.runtime import make_session

ZETA, GAMMA = 1.1, -0.1
BETA_START, BETA_END = 20.0, 2.0
WARMUP = 0.2
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8


def rectified_sigmoid(v: np.ndarray) -> np.ndarray:
    return np.clip(1.0 / (1.0 + np.exp(-v)) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _reconstruction(delta: np.ndarray, gram: np.ndarray, rounded: np.ndarray, noise: float) -> float:
    """sum_o E[(W~ (x + n) - W x)_o^2] = sum_g trace(D_g G_g D_g^T) + noise * |W~|^2, for input noise n of variance ``noise``."""
    return float(np.sum(np.matmul(delta, gram) * delta) + noise * np.sum(rounded * rounded))


@dataclass
class Rounding:
    """The outcome for one layer: integer codes, and the objective before and after."""
    codes: np.ndarray         # [g, O/g, K] signed integers
    nearest_error: float
    learned_error: float
    flipped: int              # weights whose rounding differs from nearest
    kept_nearest: bool


def learn_rounding(matrix: np.ndarray, scale: np.ndarray, gram: np.ndarray, bits: int, *, iterations: int,
                   lr: float, reg: float, noise: float = 0.0) -> Rounding:
    """AdaRound on one layer: ``matrix`` [g, O/g, K] float weights, ``scale`` broadcastable to it,
    ``gram`` [g, K, K]. Returns the signed integer codes (symmetric grid [-2^(b-1), 2^(b-1) - 1])."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    scaled = matrix / scale
    floor = np.floor(scaled)
    rest = scaled - floor
    nearest = np.clip(np.round(scaled), qmin, qmax)
    nearest_error = _reconstruction(scale * nearest - matrix, gram, scale * nearest, noise)
    # The loop runs in float32 (twice the speed of float64): only the sign of V is kept in the end.
    f32 = np.float32
    target, step, corr, low = matrix.astype(f32), scale.astype(f32), gram.astype(f32), floor.astype(f32)
    p = np.clip((rest - GAMMA) / (ZETA - GAMMA), 1e-6, 1 - 1e-6)
    v = np.log(p / (1 - p)).astype(f32)
    m, s2 = np.zeros_like(v), np.zeros_like(v)
    warmup = int(WARMUP * iterations)
    for t in range(1, iterations + 1):
        sig = 1.0 / (1.0 + np.exp(-v))
        raw = sig * f32(ZETA - GAMMA) + f32(GAMMA)
        h = np.clip(raw, 0.0, 1.0)
        codes = low + h
        inside = (codes >= qmin) & (codes <= qmax)
        rounded = step * np.clip(codes, qmin, qmax)
        grad_h = f32(2.0) * (np.matmul(rounded - target, corr) + f32(noise) * rounded) * step * inside
        if t > warmup:
            progress = (t - warmup) / max(iterations - warmup, 1)
            beta = BETA_END + (BETA_START - BETA_END) * (1.0 - progress)
            centered = f32(2.0) * h - f32(1.0)
            grad_h -= f32(2.0 * reg * beta) * np.abs(centered) ** f32(beta - 1.0) * np.sign(centered)
        grad_v = grad_h * f32(ZETA - GAMMA) * sig * (1.0 - sig) * ((raw > 0.0) & (raw < 1.0))
        m = f32(ADAM_BETAS[0]) * m + f32(1 - ADAM_BETAS[0]) * grad_v
        s2 = f32(ADAM_BETAS[1]) * s2 + f32(1 - ADAM_BETAS[1]) * grad_v * grad_v
        m_hat = m / f32(1 - ADAM_BETAS[0] ** t)
        s2_hat = s2 / f32(1 - ADAM_BETAS[1] ** t)
        v -= f32(lr) * m_hat / (np.sqrt(s2_hat) + f32(ADAM_EPS))
    learned = np.clip(floor + (v >= 0), qmin, qmax)
    learned_error = _reconstruction(scale * learned - matrix, gram, scale * learned, noise)
    if learned_error >= nearest_error:
        return Rounding(nearest, nearest_error, nearest_error, 0, True)
    return Rounding(learned, nearest_error, learned_error, int(np.count_nonzero(learned != nearest)), False)


@register
class AdaRound(Pass):
    name = "adaround"
    kind = PassKind.ANNOTATING
    after = ("calibrate",)

    @dataclass(frozen=True)
    class Options:
        iterations: int = 500
        lr: float = 0.01
        reg: float = 0.01
        samples: int = 16
        positions: int = 512
        act_noise: bool = True
        seed: int = 0

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        opts = self.options
        if opts.iterations < 1 or opts.samples < 1 or opts.positions < 1:
            raise QccError("adaround: iterations, samples and positions must be at least 1")
        layers = self._layers(module, ctx)
        if not layers:
            return PassResult(False, {"layers": 0})
        if ctx.calib_data is None:
            ctx.remark("graph", "adaround needs calibration data (--calib-data); weights left to insert-qdq's rounding")
            return PassResult(False, {"layers": 0})
        grams = self._grams(module, layers, ctx)
        start = time.perf_counter()
        ratios, flipped, kept, total = [], 0, 0, 0
        with Progress(len(layers), "adaround") as bar:
            for layer in layers:
                encoding = weight_encoding(layer.weight, ctx.config.weight_bits, layer.quant_axis(ctx.config.per_channel))
                matrix = layer.to_matrix(layer.weight.astype(np.float64))
                scale = _scale_matrix(layer, encoding, matrix.shape)
                rounding = learn_rounding(matrix, scale, grams[layer], ctx.config.weight_bits, iterations=opts.iterations,
                                          lr=opts.lr, reg=opts.reg, noise=self._input_noise(module, layer))
                values = (scale * rounding.codes).astype(np.float32)  # on the grid: s * n, exactly as DequantizeLinear
                name = layer.weight_tensor.name
                set_input_const(module.graph, layer.node, 1, layer.from_matrix(values))
                module.encodings[name] = encoding
                if rounding.nearest_error > 0:
                    ratios.append(rounding.learned_error / rounding.nearest_error)
                flipped += rounding.flipped
                kept += rounding.kept_nearest
                total += rounding.codes.size
                bar.advance()
        stats = {"layers": len(layers), "kept-nearest": kept, "flipped-percent": 100.0 * flipped / max(total, 1),
                 "optimize-seconds": time.perf_counter() - start}
        if ratios:
            stats["error-ratio-mean"] = float(np.mean(ratios))  # learned / nearest output MSE, per layer
        return PassResult(True, stats)

    def _input_noise(self, module: Module, layer: LinearLayer) -> float:
        """Variance step^2 / 12 of the rounding noise the layer's input will carry, from its encoding
        (calibrate before adaround); 0 when it has none."""
        encoding = module.encodings.get(layer.node.inputs[0].name)
        if not self.options.act_noise or encoding is None or encoding.dtype != "int":
            return 0.0
        bits = int(module.annotations.get(layer.node.inputs[0].name, {}).get("act_bits", encoding.bw))
        step = float(encoding.max[0] - encoding.min[0]) / (2 ** bits - 1)
        return step * step / 12.0

    def _layers(self, module: Module, ctx: PassContext) -> list[LinearLayer]:
        layers = []
        for node in module.graph.nodes:
            if node.op == "ConvTranspose":
                ctx.remark(node, "ConvTranspose is not handled by adaround; insert-qdq rounds it to nearest")
                continue
            if node.op not in ("Conv", "Gemm", "MatMul") or len(node.inputs) < 2 or const_value(node.inputs[1]) is None:
                continue
            layer, why = linear_layer(node)
            if layer is None:
                ctx.remark(node, f"not rounded: {why}")
                continue
            if layer.weight_tensor.name in module.encodings:
                continue  # already rounded (a previous run) or given an encoding: insert-qdq uses it
            if uses(module.graph, layer.weight_tensor) != 1:
                ctx.remark(node, "weight shared with another node: not rounded")
                continue
            layers.append(layer)
        return layers

    def _grams(self, module: Module, layers: list[LinearLayer], ctx: PassContext) -> dict:
        """G = E[x x^T] of every layer's input patches over the calibration samples, one onnxruntime pass."""
        opts = self.options
        rng = np.random.default_rng(opts.seed)
        graph_inputs = {t.name for t in module.graph.inputs}
        names = sorted({layer.node.inputs[0].name for layer in layers})
        outputs = [n for n in names if n not in graph_inputs]
        session = make_session(module, extra_outputs=outputs)
        grams, rows = {}, {}
        total = min(opts.samples, len(ctx.calib_data)) if hasattr(ctx.calib_data, "__len__") else None
        count = 0
        with Progress(total, "adaround: layer inputs") as bar:
            for sample in ctx.calib_data:
                if count == opts.samples:
                    break
                values = dict(zip(outputs, session.run(outputs, sample)))
                values.update({n: sample[n] for n in names if n in graph_inputs})
                for layer in layers:
                    patches = layer.patches(values[layer.node.inputs[0].name], opts.positions, rng).astype(np.float64)
                    gram = np.einsum("pgk,pgl->gkl", patches, patches)
                    grams[layer] = grams[layer] + gram if layer in grams else gram
                    rows[layer] = rows.get(layer, 0) + len(patches)
                count += 1
                bar.advance()
        if count == 0:
            raise QccError("adaround: calibration data is empty")
        return {layer: grams[layer] / rows[layer] for layer in layers}


def _scale_matrix(layer: LinearLayer, encoding: Encoding, shape: tuple) -> np.ndarray:
    """The encoding's scale broadcast to the [g, O/g, K] weight matrix."""
    scale = np.asarray(encoding.scale, dtype=np.float64)
    if encoding.axis is None:
        return np.full((1, 1, 1), scale[0])
    return scale.reshape(shape[0], shape[1], 1)
