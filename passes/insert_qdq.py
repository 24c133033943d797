"""Materialise encodings as QuantizeLinear/DequantizeLinear nodes, in the QDQ form onnxruntime's QNN EP reads.

Activations (every float tensor with an encoding; graph inputs included): one Q -> DQ pair shared
by all consumers, as onnxruntime's quantizer writes it. A graph output keeps its name on the DQ:

    %t = Relu(%c)                         %t = Relu(%c_dq)
    %u = MaxPool(%t)              ->      %t_q = QuantizeLinear(%t, @t_scale, @t_zero_point)
                                          %t_dq = DequantizeLinear(%t_q, @t_scale, @t_zero_point)
                                          %u = MaxPool(%t_dq)

Weights (Conv/ConvTranspose/Gemm/MatMul input 1, Batch/Instance/LayerNormalization scale) are stored quantized,
with no Q node: ``@w_quantized (int8) -> DequantizeLinear(axis) -> Conv``. Symmetric, per output
channel (axis 0 for Conv and Gemm with transB=1, 1 for ConvTranspose and Gemm with transB=0);
MatMul and InstanceNormalization weights per tensor (QNN has no per-channel MatMul; its HTP InstanceNorm
refuses a per-channel scale, and a scale or B quantized like an activation), as are all weights with per-channel=false
or opset < 13 (per-axis DequantizeLinear needs 13). A zero (padded) channel gets the minimum range,
so its scale is valid and its weights quantize to 0. An encoding already in ``module.encodings`` for
a weight (a loaded encodings file, AdaRound) is used as is.

LayerNormalization's scale is unsigned over [min(0, w), max(0, w)], per tensor: HTP refuses a signed one beside an
int32 bias.

Biases (Conv/ConvTranspose/Gemm input 2, Batch/Instance/LayerNormalization B): int32, zero point 0, scale
s_in * s_w per channel. If a bias value would overflow int32, that channel's symmetric weight scale is raised
until it fits (onnxruntime does the same); LayerNormalization's unsigned scale is not raised.

Other float constants feeding data inputs (Add/Mul/Div operands, ...) are quantized like
activations at the activation bit-width from their own min/max (onnxruntime gives them the activation
type too); a constant input of a shared-encoding op (Concat, Pad, ...) takes that op's output
encoding. Parameter inputs (Clip bounds, Resize scales, BatchNormalization mean/var) stay float.

Bit-widths: an activation keeps its ``act_bits`` annotation, else takes ``act-bits``; an encoding
of another width is re-derived from its range (fixed ranges re-encoded exactly). 8-bit Q/DQ use the
default domain; 16-bit ones the default domain from opset 21, else ``com.microsoft`` (onnxruntime's
contrib Q/DQ, which its CPU and QNN providers both run). Tensors that are already quantized (consumed
by a QuantizeLinear or produced by a DequantizeLinear) are skipped, so a second run changes nothing.
The model's metadata ``qcc.qdq-constants`` maps each quantized constant to its stored initializer.
"""
from __future__ import annotations

from compiler.ir import Module
from compiler.pass_manager import Pass, PassContext, PassKind, PassResult, register
from compiler.qdq import lower_to_qdq

QUANTIZING_STATS = ("activations", "weights", "biases", "constants")


@register
class InsertQdq(Pass):
    name = "insert-qdq"
    kind = PassKind.LOWERING
    after = ("calibrate", "propagate-encodings", "bias-correction", "adaround", "brecq", "promote-16bit")

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        stats = lower_to_qdq(module, ctx.config, ctx.remark)
        return PassResult(any(stats.get(key) for key in QUANTIZING_STATS), stats)
