"""The quantization config of one compile (design.md decision 9): the bit-widths and the weights'
granularity every pass reads (``ctx.config``), set by the target and the command line. Per-tensor
exceptions (a tensor promoted to 16 bits, a fixed range) are annotations on the module, not config.

In pipeline text the config is a leading ``quant{...}`` element, printed whenever the pipeline
quantizes, so the ``qcc.pipeline`` metadata of a compiled model records it:

    quant{act-bits=8 weight-bits=8 bias-bits=32 per-channel=true},fold-bn,calibrate,insert-qdq

QNN's HTP takes 8- or 16-bit activations, 4-, 8- or 16-bit weights (symmetric) and int32 biases.
"""
from __future__ import annotations

from dataclasses import dataclass

from compiler.errors import QccError

CONFIG_NAME = "quant"
ACT_BITS = (8, 16)
WEIGHT_BITS = (4, 8, 16)
BIAS_BITS = (32,)


@dataclass(frozen=True)
class QuantConfig:
    act_bits: int = 8
    weight_bits: int = 8
    bias_bits: int = 32
    per_channel: bool = True

    def __post_init__(self):
        for key, value, allowed in (("act-bits", self.act_bits, ACT_BITS), ("weight-bits", self.weight_bits, WEIGHT_BITS),
                                    ("bias-bits", self.bias_bits, BIAS_BITS)):
            if value not in allowed:
                raise QccError(f"{CONFIG_NAME}: {key} must be {' or '.join(map(str, allowed))}, got {value}")
