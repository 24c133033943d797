"""Compute activation encodings from sample data: min-max, percentile, entropy (KL), MSE, or per tensor the best (auto).

Runs ``ctx.calib_data`` through the float model once (compiler.calibration: one onnxruntime
session, samples streamed, statistics cached in ``module.cache`` so later passes and re-runs do not
recompute them) and fills ``module.encodings`` for every float activation — graph inputs included,
constants not — that has no encoding yet:

    encoding(t) = activation_encoding(lo, hi, bw)     (lo, hi) = the method's range of t's values
    bw          = t's ``act_bits`` annotation, else the config's ``act-bits``

Fixed ranges win over statistics: a ``fixed_range`` annotation, else the range the producing op
fixes (Sigmoid, HardSigmoid, Softmax, Clip(0, 1) -> [0, 1]; Tanh -> [-1, 1]), encoded with
compiler.encoding.range_encoding. Other Clips (Relu6 = Clip(0, 6)) keep their calibrated range:
it lies within the clip bounds already, and when the data never reaches 6 it is finer than [0, 6].

The default method is MSE, the htp target's choice at 8 bits (measured: docs/measurements.md;
at 16 bits that target uses min-max, which clips nothing).

``method=auto`` chooses per tensor among min-max, percentile and MSE: the one whose encoding
quantizes that tensor's calibration values (its histogram) with the highest SQNR
(compiler.calibration.choose_encoding). Stats count the choices (``auto-minmax``, ...);
``module.cache["calibration-choices"]`` maps each tensor to (method, SQNR dB).

Tensors that already have an encoding (an earlier pass, a loaded encodings file, a previous run)
keep it: the pass is idempotent and never undoes propagate-encodings. A graph that already holds
QuantizeLinear/DequantizeLinear nodes is left alone.
"""
from __future__ import annotations

from dataclasses import dataclass

from compiler.calibration import AUTO, METHODS, activation_tensors, choose_encoding, encoding_from_observer, statistics
from compiler.encoding import fixed_ranges, has_qdq, range_encoding
from compiler.ir import Module, QccError
from compiler.pass_manager import Pass, PassContext, PassKind, PassResult, choices, register

CHOICES_KEY = "calibration-choices"


@register
class Calibrate(Pass):
    name = "calibrate"
    kind = PassKind.ANNOTATING

    @dataclass(frozen=True)
    class Options:
        method: str = choices(*METHODS, AUTO, default="mse")
        percentile: float = 99.99
        bins: int = 2048

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        opts = self.options
        if not 50.0 < opts.percentile <= 100.0:
            raise QccError(f"calibrate: percentile must be in (50, 100], got {opts.percentile}")
        if opts.bins < 16:
            raise QccError(f"calibrate: bins must be at least 16, got {opts.bins}")
        if has_qdq(module.graph):
            ctx.remark("graph", "already has QuantizeLinear/DequantizeLinear nodes; calibrate runs before insert-qdq")
            return PassResult(False)
        tensors = activation_tensors(module)
        todo = [name for name in tensors if name not in module.encodings]
        if not todo:
            return PassResult(False, {"kept": len(tensors)})
        fixed = fixed_ranges(module)
        measured = [name for name in todo if name not in fixed]
        stats = None
        if measured:
            if ctx.calib_data is None:
                raise QccError("calibrate needs --calib-data (a folder of sample inputs) to measure activation ranges")
            stats = statistics(module, ctx.calib_data, measured, opts.method, opts.bins, ctx.runner)
        choices_made = {}
        for name in todo:
            bw = int(module.annotations.get(name, {}).get("act_bits", ctx.config.act_bits))
            if name in fixed:
                module.encodings[name] = range_encoding(*fixed[name], bw)
            elif opts.method == AUTO:
                method, module.encodings[name], sqnr = choose_encoding(stats.observers[name], bw, opts.percentile)
                choices_made[name] = (method, sqnr)
            else:
                module.encodings[name] = encoding_from_observer(stats.observers[name], opts.method, bw, opts.percentile)
        result = {"encoded": len(todo) - len(set(todo) & set(fixed)), "fixed-range": len(set(todo) & set(fixed)),
                  "kept": len(tensors) - len(todo)}
        if choices_made:
            module.cache[CHOICES_KEY] = {**module.cache.get(CHOICES_KEY, {}), **choices_made}
            for method, _ in choices_made.values():
                result[f"auto-{method}"] = result.get(f"auto-{method}", 0) + 1
        if stats is not None:
            result["samples"] = stats.samples
        return PassResult(True, result)
