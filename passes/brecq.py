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

Options: ``iterations`` Adam steps per block at learning rate ``lr``, each on a mini-batch of ``batch``
of the first ``samples`` calibration samples (batches and drop masks seeded by ``seed``); ``reg`` weighs
the regulariser; ``weight-bits`` and ``per-channel`` give the weights' grid, as insert-qdq's.

``learn-scales=true`` also learns each activation encoding's scale (LSQ, Esser et al. 2020, as QDrop learns
them): scale * exp(u) with u shared by the tensors propagate-encodings gives one encoding, the zero point
kept (float 0 stays exact), fixed ranges (Sigmoid, Softmax) left alone; Adam at ``scale-lr``. The learned
scales go into module.encodings. It lowers the block errors further but not the held-out ones, so it is
off by default.

The pass is in no default pipeline: on PP-OCR at W8A8 the block errors on the calibration samples fall
(det: to 0.84 of nearest rounding's) while the held-out cosines move within their fold-to-fold spread,
and it takes minutes on det where the default pipeline takes seconds (docs/measurements.md). At 8 bits
the weights' rounding is not where the loss is; it is in the activations, whose encodings this pass
leaves as calibrate chose them unless learn-scales=true.

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
        seed: int = 0

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        opts = self.options
        if opts.iterations < 1 or opts.samples < 1 or opts.batch < 1 or opts.block_layers < 1:
            raise QccError("brecq: iterations, samples, batch and block-layers must be at least 1")
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

