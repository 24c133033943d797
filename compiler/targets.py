"""Targets: a named pipeline plus the quantization defaults QNN's backend expects.

CPU and GPU take float models; DSP, HTP and HTA take quantized ones (QNN's rules).
``--passes`` replaces a target's pipeline entirely.

A quantized target's pipeline is built when asked (``Target.pipeline_text``), from the passes
registered at that moment, so a rewrite that is not installed is simply left out:

    canonicalize (opset 14: HardSwish is an ONNX op from 14)
    -> float rewrites: fold-bn, fuse-hardswish, fold-affine, replace-se, cle
    -> calibrate{method, act-bits} -> adaround{iterations=200 samples=8} -> bias-correction{samples=8}
    -> propagate-encodings
    -> insert-qdq{act-bits, weight-bits, per-channel}

Measured on the PP-OCR models, held-out rendered text images (cls: two folds of 32/32; det: 32
calibration + 32 held-out with PaddleOCR's ImageNet normalisation):
- calibration at 8 bits: percentile 99.99 is the best or tied method (det W8A8 0.93 against 0.89
  for MSE and 0.90 for min-max; cls within noise of the others); at 16 bits min-max (cls W8A16
  0.9998 / 0.9996 on 192 held-out images against 0.9995 for percentile; det 0.970 against 0.968);
- bias-correction{samples=8} (as good as 32 samples, in a quarter of the time) lifts cls W8A16
  from ~0.998 to >= 0.999 on both folds and the worst cls W8A8 samples; it does not move det;
- cle + adaround{iterations=200 samples=8} (one run, same code, 32 calibration + 48 held-out det
  images, cls 64 + 136 on two folds): det W8A8 0.949 -> 0.959 (IoU 0.896 -> 0.915), det W8A16
  0.971 -> 0.992 (IoU 0.928 -> 0.968); cls W8A8 0.9943 / 0.9966 -> 0.9971 / 0.9986, cls W8A16
  within noise (0.999+). Adaround adds ~2 s on cls and ~10-25 s on det; 200 iterations and 8
  samples did as well as 500 and 16. bias-correction stays after it: a no-op on the rounded
  weights, it still corrects the layers adaround declines (shared weights);
- pad-channels was accuracy-neutral; its benefit is HTP speed, not measured here, so it is left
  out of the default pipeline (add it with --passes where the HMX tiling gain is wanted).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from compiler.ir import QccError

CANONICALIZE = "fold-constants,cleanup,upgrade-opset{version=13}"


@dataclass(frozen=True)
class QuantDefaults:
    act_bits: int = 8
    weight_bits: int = 8
    per_channel: bool = True
    calib_method: str | None = None  # None: percentile at 8-bit activations, min-max at 16 (see above)


QUANTIZED_CANONICALIZE = "fold-constants,cleanup,upgrade-opset{version=14}"
FLOAT_REWRITES = ("fold-bn", "fuse-hardswish", "fold-affine", "replace-se", "cle")
# Annotating passes between calibrate and propagate-encodings, with fixed options; they also get the
# target's weight options. Bias correction on 8 samples did as well as on 32 (cls, two folds), in a quarter of the time.
QUANT_TUNING = (("adaround", {"iterations": 200, "samples": 8}), ("bias-correction", {"samples": 8}))


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    canonicalize: str  # a float target's whole pipeline; a quantized target's first passes
    quantized: bool
    quant: QuantDefaults | None = None

    @property
    def pipeline(self) -> str:
        """The default pipeline text (built from the registered passes for a quantized target)."""
        return self.pipeline_text()

    def pipeline_text(self, act_bits: int | None = None, weight_bits: int | None = None,
                      calib_method: str | None = None) -> str:
        """The pipeline with the target's quantization defaults, each overridable (CLI flags)."""
        if self.quant is None:
            given = [flag for flag, value in (("--act-bits", act_bits), ("--weight-bits", weight_bits),
                                              ("--calib-method", calib_method)) if value is not None]
            if given:
                raise QccError(f"target '{self.name}' is not quantized; {', '.join(given)} needs a quantized target "
                               f"({', '.join(n for n, t in TARGETS.items() if t.quant)})")
            return self.canonicalize
        from compiler.pass_manager import load_passes
        registry = load_passes()
        act = act_bits or self.quant.act_bits
        weight = weight_bits or self.quant.weight_bits
        per_channel = "true" if self.quant.per_channel else "false"
        parts = [self.canonicalize, *(p for p in FLOAT_REWRITES if p in registry),
                 f"calibrate{{method={calib_method or self.quant.calib_method or default_method(act)} act-bits={act}}}"]
        for name, fixed in QUANT_TUNING:
            if name in registry:
                fields = {f.name for f in dataclasses.fields(registry[name].Options)}
                wanted = {**fixed, "weight_bits": weight, "per_channel": per_channel}
                options = [f"{key.replace('_', '-')}={value}" for key, value in wanted.items() if key in fields]
                parts.append(f"{name}{{{' '.join(options)}}}" if options else name)
        parts += ["propagate-encodings", f"insert-qdq{{act-bits={act} weight-bits={weight} per-channel={per_channel}}}"]
        return ",".join(parts)


TARGETS = {
    "cpu": Target("cpu", "QNN CPU backend: float model, canonicalized", CANONICALIZE, quantized=False),
    "gpu": Target("gpu", "QNN GPU backend: float model, canonicalized", CANONICALIZE, quantized=False),
    "htp": Target("htp", "QNN HTP backend: W8A8, per-channel weights (--act-bits 16 for W8A16)",
                  QUANTIZED_CANONICALIZE, quantized=True, quant=QuantDefaults()),
    "dsp": Target("dsp", "QNN DSP backend: W8A8, per-tensor weights", QUANTIZED_CANONICALIZE, quantized=True,
                  quant=QuantDefaults(per_channel=False)),
    "hta": Target("hta", "QNN HTA backend: W8A8, per-tensor weights", QUANTIZED_CANONICALIZE, quantized=True,
                  quant=QuantDefaults(per_channel=False)),
}


def default_method(act_bits: int) -> str:
    """8-bit activations: clipping the rarest 0.01 % buys resolution; 16 bits have resolution to spare,
    so clipping only costs accuracy."""
    return "percentile" if act_bits <= 8 else "minmax"


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise QccError(f"unknown target '{name}'; valid targets: {', '.join(TARGETS)}")
    return TARGETS[name]
