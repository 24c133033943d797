"""Block reconstruction: learn weight rounding block by block through the quantized model (BRECQ, QDrop).

AdaRound (passes/adaround.py) fits each layer's rounding to its own output with float inputs. BRECQ
(Li et al. 2021) fits the rounding of all layers of a block together, against the FP32 block output,
with the block's activations quantized as the QDQ model will quantize them, so the layers' errors
can cancel inside the block and the activations' rounding and clipping count:

    min_V  E || B_q(x_q; W~(V)) - B(x) ||^2  +  reg * sum (1 - |2 h(V) - 1|^beta)

per block B in topological order, x the FP32 block input, x_q the input in the quantized model
(the blocks before it already reconstructed), W~(V) = s * clip(floor(W / s) + h(V), qmin, qmax) as in
AdaRound (rectified sigmoid h, V starting at nearest rounding, no regulariser for the first 20 % of
the iterations, beta annealed from 20 to 2). The squared error is summed over channels and averaged
over samples and positions, as BRECQ's. QDrop (Wei et al. 2022, ``drop``): while learning, each
activation element of the block and of its input keeps its float value with probability ``drop``, so
the rounding does not overfit to the few calibration samples' quantization noise; ``drop=0`` is
BRECQ's.

A block is a run of nodes between two cut points of the QDQ simulation, a quantized activation that
is the only tensor alive there (a residual block's input and output); runs are merged until each
holds at least ``block-layers`` weighted layers. Detectors with long skip connections get large
blocks.

The quantized model is the one insert-qdq would write after propagate-encodings (run calibrate
first), run in PyTorch (compiler.torch_graph), which makes this pass need the ``torch`` extra; without
it, or with an op the torch simulation lacks, it declines with a remark. Learned weights are written
back exactly on their grid with their encoding in module.encodings, as adaround's; a block whose
learned rounding does not lower its error on the calibration samples keeps nearest rounding.

Measured at W8A8 on PP-OCR (calibrate, brecq, then the default sequential bias-correction; 32 calibration
images, mean held-out cosine to FP32), so it is in no default pipeline (compiler/targets.py):

    cls, 192 held out, offsets 0 / 64 / 128 / 192        fold cosines                       mean
    default pipeline                                     0.99776  0.99663  0.99612  0.99652  0.99676
    + brecq (iterations=100 lr=0.01 drop=0.5)            0.99730  0.99747  0.99713  0.99660  0.99713
      (SQNR over the 192 images, dB: default 24.54 22.70 22.07 22.56, + brecq 23.79 24.05 23.50 22.90)
    + brecq block-layers=1                               0.99737  0.99730  0.99654  0.99595  0.99679
    + brecq block-layers=4                               0.99820  0.99684  0.99605  0.99585  0.99674
    + brecq iterations=200                               0.99757  0.99812  0.99609  0.99530  0.99677
    + brecq lr=0.03                                      0.99562     -     0.99554     -
    + brecq lr=0.03 drop=0 (BRECQ without QDrop)         0.99681     -     0.99566     -
    det, offset 0, 64 held out, samples=16: 0.99019 against 0.99061 without it, in 245 s against 2 s.

On tools/bench.py's fold A alone (held-out images 32-63, a sixth of the first fold above) it reaches the
bar: cls 0.99979 (min 0.99710, SQNR 32.8 dB) against 0.99722 (0.96542, 22.6 dB); det 0.98966 against
0.98999 (0.98842 against 0.99119 once propagate-encodings kept scalar affine ops on their input's grid); RapidAI's orientation classifier 0.99684 (min 0.96622) against 0.99488 (ORT MinMax 0.99754), in 72 s.
The other 160 images of cls's first fold bring it down to 0.99730, and on the bench's fold B (--offset 32) it
loses: 0.99729 (min 0.96930) against 0.99875 (0.98758). Its gain depends on the images, and on float
rounding: FP32 targets computed on stacked samples instead of one at a time (differing by about 1e-6) give
fold A 0.99945 (min 0.98784) instead. On HTP (onnxruntime-qnn,
v73, CPU fallback disabled) the fold-A model agrees with the CPU simulation to 0 steps.

``learn-scales=true`` also learns each activation encoding's scale (LSQ, Esser et al. 2020, as QDrop learns
them): scale * exp(u) with u shared by the tensors propagate-encodings gives one encoding, the zero point
kept (float 0 stays exact), fixed ranges (Sigmoid, Softmax) left alone; Adam at ``scale-lr``. The learned
scales go into module.encodings. It lowers the block errors further (det 0.79 of nearest's against 0.84) but
not the held-out ones: cls over the four folds 0.99713 0.99726 0.99679 0.99656 (mean 0.99694, against
0.99713 without), det on fold A 0.98630 against 0.98999. So it is off by default.

The block errors on the calibration samples fall (to 0.84 of nearest rounding's on det), the held-out
cosines much less: at 8 bits the weights' rounding is not where the loss is (it is in the activations,
whose encodings this pass leaves as calibrate chose them unless learn-scales=true, which did not help either). About 25 s on cls, 4 minutes on det (2 cores).

Kind: ANNOTATING. The float weights change on purpose (they become their quantized values).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

from compiler.ir import Module, QccError
from compiler.pass_manager import Pass, PassContext, PassKind, PassResult, register


@register
class Brecq(Pass):
    name = "brecq"
    kind = PassKind.ANNOTATING
    after = ("calibrate", "adaround")
    optional_module = "torch"

    @dataclass(frozen=True)
    class Options:
        iterations: int = 100
        lr: float = 0.01
        reg: float = 0.01
        samples: int = 32
        batch: int = 8
        drop: float = 0.5
        learn_scales: bool = False
        scale_lr: float = 0.001
        block_layers: int = 2
        weight_bits: int = 8
        per_channel: bool = True
        seed: int = 0

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        opts = self.options
        if opts.iterations < 1 or opts.samples < 1 or opts.batch < 1 or opts.block_layers < 1:
            raise QccError("brecq: iterations, samples, batch and block-layers must be at least 1")
        if opts.weight_bits not in (4, 8, 16):
            raise QccError(f"brecq: weight-bits must be 4, 8 or 16, got {opts.weight_bits}")
        if not 0.0 <= opts.drop < 1.0:
            raise QccError(f"brecq: drop must be in [0, 1), got {opts.drop}")
        if not self.available():
            ctx.remark("graph", "brecq needs PyTorch (pip install 'qcc[torch]'); weights left to insert-qdq's rounding")
            return PassResult(False, {"blocks": 0})
        if ctx.calib_data is None:
            ctx.remark("graph", "brecq needs calibration data (--calib-data); weights left to insert-qdq's rounding")
            return PassResult(False, {"blocks": 0})
        if not any(enc.dtype == "int" and not enc.symmetric for enc in module.encodings.values()):
            ctx.remark("graph", "brecq reconstructs the quantized model: run calibrate first; nothing learned")
            return PassResult(False, {"blocks": 0})
        samples = list(itertools.islice(ctx.calib_data, opts.samples))
        if not samples:
            raise QccError("brecq: calibration data is empty")
        from compiler import reconstruction  # imports torch, which only this pass needs
        return reconstruction.reconstruct(module, ctx, samples, opts)

