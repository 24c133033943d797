"""Targets: a named pipeline and the quantization config QNN's backend expects.

CPU and GPU take float models; DSP, HTP and HTA take quantized ones (QNN's rules). ``--passes``
replaces a target's pipeline. A quantized target's pipeline (``Target.build``):

    canonicalize (opset 17: HardSwish is an ONNX op from 14, LayerNormalization from 17)
    -> float rewrites: fold-bn, matmul-to-gemm, fuse-hardswish, fuse-gelu, fuse-layernorm, fold-affine, replace-se, cle
    -> calibrate{method} -> adaround{iterations=200 samples=8} -> brecq -> bias-correction{samples=8}
    -> propagate-encodings
    -> insert-qdq

under ``quant{act-bits, weight-bits, per-channel}`` (compiler.config), with per activation width
(WIDTH_DEFAULTS): W8A8 calibrate{method=mse} and bias-correction{mode=sequential samples=4}, W8A16
calibrate{method=minmax} and bias-correction{mode=empirical samples=8}, and at both widths no adaround
(bias correction corrects the rounding bias instead) and no brecq (it needs the torch extra too). Each
choice was measured against the others on the PP-OCR models (docs/measurements.md, "targets").
pad-channels is accuracy-neutral and left out: its gain is HMX tiling speed (add it with --passes).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from compiler.config import NO_HTP, QuantConfig
from compiler.errors import QccError
from compiler.pass_manager import Pipeline, check_contracts, make_pass, parse_pipeline

CANONICALIZE = "fold-constants,cleanup,upgrade-opset{version=13}"


@dataclass(frozen=True)
class QuantDefaults:
    config: QuantConfig = QuantConfig()
    calib_method: str | None = None  # None: the activation width's default (WIDTH_DEFAULTS)


QUANTIZED_CANONICALIZE = "fold-constants,cleanup,upgrade-opset{version=17}"
FLOAT_REWRITES = ("fold-bn", "matmul-to-gemm", "fuse-hardswish", "fuse-gelu", "fuse-layernorm", "fold-affine", "replace-se",
                  "cle")
# Annotating passes between calibrate and propagate-encodings, with fixed options. Bias correction on 8
# samples did as well as on 32 (cls, two folds), in a quarter of the time.
QUANT_TUNING = (("adaround", {"iterations": 200, "samples": 8}), ("brecq", {}), ("bias-correction", {"samples": 8}))
# The passes a default pipeline may leave out (WidthDefaults.left_out); fold-bn always runs.
OPTIONAL_PASSES = FLOAT_REWRITES[1:] + tuple(name for name, _ in QUANT_TUNING)


@dataclass(frozen=True)
class WidthDefaults:
    """What the default pipeline at one activation width uses (measured, see the module docstring)."""
    calib_method: str
    left_out: frozenset = frozenset()  # of OPTIONAL_PASSES
    tuning: dict = dataclasses.field(default_factory=dict)  # pass -> options over QUANT_TUNING's


WIDTH_DEFAULTS = {
    8: WidthDefaults("mse", frozenset({"adaround", "brecq"}), {"bias-correction": {"mode": "sequential", "samples": 4}}),
    16: WidthDefaults("minmax", frozenset({"adaround", "brecq"})),
}


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    canonicalize: str  # a float target's whole pipeline; a quantized target's first passes
    quantized: bool
    quant: QuantDefaults | None = None

    def build(self, act_bits: int | None = None, weight_bits: int | None = None, calib_method: str | None = None,
              left_out: frozenset | None = None, tuning: dict | None = None, htp_arch: str | None = None) -> Pipeline:
        """The pipeline with the target's quantization defaults, each overridable (CLI flags); ``left_out``
        replaces the width's set of OPTIONAL_PASSES left out, ``tuning`` (pass -> options) its QUANT_TUNING
        options (tools/bench.py's ablations). Every pass named must be registered."""
        if self.quant is None:
            given = [flag for flag, value in (("--act-bits", act_bits), ("--weight-bits", weight_bits),
                                              ("--calib-method", calib_method), ("--htp-arch", htp_arch)) if value is not None]
            if given:
                raise QccError(f"target '{self.name}' is not quantized; {', '.join(given)} needs a quantized target "
                               f"({', '.join(n for n, t in TARGETS.items() if t.quant)})")
            return parse_pipeline(self.canonicalize)
        if htp_arch is not None and self.quant.config.htp_arch == NO_HTP:
            raise QccError(f"--htp-arch: target '{self.name}' is not HTP (use --target htp)")
        config = dataclasses.replace(self.quant.config, **{key: value for key, value in
                                                           (("act_bits", act_bits), ("weight_bits", weight_bits),
                                                            ("htp_arch", htp_arch)) if value is not None})
        defaults = width_defaults(config.act_bits)
        left_out = defaults.left_out if left_out is None else left_out
        unknown = set(left_out) - set(OPTIONAL_PASSES)
        if unknown:
            raise QccError(f"cannot leave out {', '.join(sorted(unknown))}; optional passes: {', '.join(OPTIONAL_PASSES)}")
        method = calib_method or self.quant.calib_method or defaults.calib_method
        pipeline = Pipeline(parse_pipeline(self.canonicalize), config)
        pipeline += [make_pass(name) for name in FLOAT_REWRITES if name not in left_out]
        pipeline.append(make_pass("calibrate", {"method": method}))
        for name, fixed in QUANT_TUNING:
            if name not in left_out:
                wanted = {**fixed, **defaults.tuning.get(name, {}), **(tuning or {}).get(name, {})}
                pipeline.append(make_pass(name, {key.replace("_", "-"): str(value) for key, value in wanted.items()}))
        pipeline += [make_pass("propagate-encodings"), make_pass("insert-qdq")]
        check_contracts(pipeline)
        return pipeline


TARGETS = {
    "cpu": Target("cpu", "QNN CPU backend: float model, canonicalized", CANONICALIZE, quantized=False),
    "gpu": Target("gpu", "QNN GPU backend: float model, canonicalized", CANONICALIZE, quantized=False),
    "htp": Target("htp", "QNN HTP backend: W8A8, per-channel weights (--act-bits 16 for W8A16)",
                  QUANTIZED_CANONICALIZE, quantized=True, quant=QuantDefaults()),
    "dsp": Target("dsp", "QNN DSP backend: W8A8, per-tensor weights", QUANTIZED_CANONICALIZE, quantized=True,
                  quant=QuantDefaults(QuantConfig(per_channel=False, htp_arch=NO_HTP))),
    "hta": Target("hta", "QNN HTA backend: W8A8, per-tensor weights", QUANTIZED_CANONICALIZE, quantized=True,
                  quant=QuantDefaults(QuantConfig(per_channel=False, htp_arch=NO_HTP))),
}


def width_defaults(act_bits: int) -> WidthDefaults:
    """The defaults at ``act_bits`` activations: 8 bits and below as 8, above as 16."""
    return WIDTH_DEFAULTS[8 if act_bits <= 8 else 16]


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise QccError(f"unknown target '{name}'; valid targets: {', '.join(TARGETS)}")
    return TARGETS[name]
