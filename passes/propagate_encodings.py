"""Share encodings across data-movement ops and fuse activations into their producers' encodings.

1. Shared encodings (compiler.encoding.SHARED_ENCODING_OPS). The float tensors each table row
   names (MaxPool in/out, Reshape in/out, every Concat input with its output, ...) are joined into
   groups, transitively across the graph, so MaxPool -> Reshape -> Concat is one group. A group's
   encoding covers the union of its members' ranges at the widest member bit-width:

       enc(group) = activation_encoding(min_i lo_i, max_i hi_i, max_i bw_i)

   For Concat this is the output's range, applied to every input. A member with a fixed range (a
   ``fixed_range`` annotation or a fixed-range op such as Sigmoid) dictates the group's encoding
   when every member's range fits in it (Sigmoid -> Reshape); when others exceed it (Concat of a
   Sigmoid and a Conv output), the fixed member keeps its own encoding and the rest share theirs.
   QNN then moves the data without requantizing.

2. Activation fusion (compiler.encoding.FUSIBLE_PRODUCERS / FUSED_ACTIVATIONS). A Conv, Gemm,
   MatMul, Add, ... whose output feeds only a Relu or Clip takes the activation's encoding, so the
   producer's quantizer clamps exactly as the activation does and QNN fuses the pair:

       %c = Conv(%x, @w)  enc(c) = [-4.6, 5.9]        %c = Conv(%x, @w)  enc(c) = [0, 5.9]
       %r = Relu(%c)      enc(r) = [0, 5.9]     ->    %r = Relu(%c)      enc(r) = [0, 5.9]

3. Saturation clamp (compiler.encoding.saturation_bounds). A tensor whose only consumer is a
   saturating activation keeps only the input interval where that activation still changes:
   HardSwish is 0 for every x <= -3, so its input's encoding starts at -3 (a Conv output calibrated
   to [-111, 83] gets [-3, 83]: 1.6x finer steps, same result); HardSigmoid beyond
   (-beta/alpha, (1-beta)/alpha); Sigmoid and Tanh beyond the point where the output is within
   a quarter step of its limit. Tensors in a shared-encoding group or with a fixed range are left alone.

4. Scalar affine maps (``y = a*x + b`` by one Mul, Div, Add or Sub with a scalar constant, or a Neg),
   such as the learnable affine blocks PP-LCNetV3 puts after each HardSwish. The output takes the
   input's grid mapped through the op, so HTP moves the codes without rounding them again: scale |a|*s,
   the offset mirrored when a < 0 and moved by round(b / scale). A b off that grid becomes a constant
   shift of at most half a step, which bias correction downstream removes; requantizing to the output's
   own calibrated grid instead adds rounding noise (0.29 step rms) to every element. An output whose
   encoding an earlier rule set, or whose mapped grid would not hold zero, keeps its own. On PP-OCR
   det W8A8 this raised the output SQNR on every fold tried (docs/measurements.md).

5. A MatMul's second input that is an activation (attention's K and V), with its shared-encoding group,
   goes on the symmetric grid: scale max|x| / (2^(bw-1) - 1), offset -2^(bw-1) (stored unsigned, zero
   point 2^(bw-1)). HTP's MatMul opdef requires that input symmetric at 16 bits (and at 8 bits before v73);
   AIMET quantizes it symmetric at every width (its loader refuses a file that says otherwise). PP-OCR
   rec on HTP v73 (2 lines): W8A8 0.97976 -> 0.98094, W8A16 0.99918 -> 0.99930 against FP32.

Runs between calibrate and insert-qdq; a graph that already has QDQ nodes is left alone.
"""
from __future__ import annotations

from dataclasses import dataclass

from compiler.encoding import has_qdq
from compiler.ir import Module
from compiler.pass_manager import Pass, PassContext, PassKind, PassResult, register
from compiler.propagation import propagate_encodings


@register
class PropagateEncodings(Pass):
    name = "propagate-encodings"
    kind = PassKind.ANNOTATING
    after = ("calibrate", "bias-correction", "adaround", "brecq")

    @dataclass(frozen=True)
    class Options:
        fuse_activations: bool = True

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        if has_qdq(module.graph):
            ctx.remark("graph", "already has QuantizeLinear/DequantizeLinear nodes; propagate-encodings runs before insert-qdq")
            return PassResult(False)
        stats = propagate_encodings(module, self.options.fuse_activations, ctx.remark)
        return PassResult(bool(stats.pop("changed")), stats)
