"""The quantization config of one compile (design.md decision 9): the bit-widths and the weights'
granularity every pass reads (``ctx.config``), set by the target and the command line. Per-tensor
exceptions (a tensor promoted to 16 bits, a fixed range) are annotations on the module, not config.

In pipeline text the config is a leading ``quant{...}`` element, printed whenever the pipeline
quantizes, so the ``qcc.pipeline`` metadata of a compiled model records it:

    quant{act-bits=8 weight-bits=8 bias-bits=32 per-channel=true},fold-bn,calibrate,insert-qdq

QNN's HTP takes 8- or 16-bit activations, 4-, 8- or 16-bit weights (symmetric; 16-bit from v73 on) and
int32 biases. ``htp-arch`` names the NPU generation the model is for (compiler.encoding.HTP_ARCHS), ``none``
for a target that is not HTP.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from compiler.encoding import HTP_ARCHS
from compiler.errors import QccError

CONFIG_NAME = "quant"
ACT_BITS = (8, 16)
WEIGHT_BITS = (4, 8, 16)
BIAS_BITS = (32,)
NO_HTP = "none"  # a target that is not HTP (dsp, hta)
# The generation a compile is checked against unless told: v73 (Snapdragon 8 Gen 2) is the oldest that takes
# 16-bit weights and computes 16-bit convolutions as the simulation does; v68/v69 devices need --htp-arch.
DEFAULT_HTP_ARCH = "73"


@dataclass(frozen=True)
class QuantConfig:
    act_bits: int = 8
    weight_bits: int = 8
    bias_bits: int = 32
    per_channel: bool = True
    htp_arch: str = field(default=DEFAULT_HTP_ARCH, metadata={"choices": (*HTP_ARCHS, NO_HTP)})

    def __post_init__(self):
        for key, value, allowed in (("act-bits", self.act_bits, ACT_BITS), ("weight-bits", self.weight_bits, WEIGHT_BITS),
                                    ("bias-bits", self.bias_bits, BIAS_BITS)):
            if value not in allowed:
                raise QccError(f"{CONFIG_NAME}: {key} must be {' or '.join(map(str, allowed))}, got {value}")
        if self.htp_arch not in (*HTP_ARCHS, NO_HTP):
            raise QccError(f"{CONFIG_NAME}: htp-arch must be one of {', '.join(HTP_ARCHS)} or {NO_HTP}, got {self.htp_arch}")
        problem = HTP_ARCHS[self.htp_arch].weight_problem(self.weight_bits) if self.htp_arch in HTP_ARCHS else ""
        if problem:
            raise QccError(f"{CONFIG_NAME}: {problem}")
        if self.htp_arch in HTP_ARCHS and self.weight_bits == 16 and self.act_bits < 16:
            # Measured on v73: every Conv, ConvTranspose and Gemm of det stored W16A8 refused (docs/htp-backend.md).
            raise QccError(f"{CONFIG_NAME}: 16-bit weights need 16-bit activations on HTP (act-bits=16; W16A8 layers "
                           f"are refused), got act-bits={self.act_bits}")
