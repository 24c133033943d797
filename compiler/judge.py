"""``--judge auto|sim|htp``: choose a compile's calibration method and bias-correction mode by the model each
choice writes, measured on calibration samples held back from calibration.

The candidates are the pipeline as given and its variants along two axes, the decisions whose best value
differs from model to model (docs/measurements.md, ablations):

- calibrate's ``method``: the pipeline's, then the others of JUDGED_METHODS (only the one given when the
  user fixed it with ``--calib-method``);
- bias-correction's ``mode``: the pipeline's, then the other modes that apply, then the pass left out.
  ``sequential`` does not apply beside promote-16bit (it simulates one width; ``with_mixed_precision``),
  ``analytic`` needs batch-norm statistics fold-bn has folded away.

``sim`` and ``htp`` try all of them (``candidates``); ``auto``, qcc compile's default on a target's W8A8
pipeline, only the pipeline as given against PAIRED (``pair``).

Every candidate shares the float rewrites before the first quantizing pass (``common_prefix``: they run
once) and calibrate's histograms (``count_histograms``: counted once); from there each runs the rest of its
pipeline on its own copy, so what is judged is what would be written, mixed precision included. Its score
is the mean over outputs of the per-sample cosine against the FP32 reference, on the held-back samples:

- ``sim`` (and ``auto``): the QDQ model on onnxruntime's CPU (graph optimisations off), as every pass measures;
- ``htp``: the QDQ model on the QNN HTP backend of the config's generation, CPU fallback off. A candidate
  the backend refuses scores nothing and is not chosen.

A candidate replaces the best so far only when it wins by more than the noise of the paired per-sample
differences (``beats``): the pipeline as given comes first and keeps its place against a close second. Cost: candidates x
(the passes from calibrate on + one run over the held-back samples); an HTP run is about 50x a CPU one (a
320x320 detector image 1.1-1.4 s), so ``--judge htp`` on det with 4 held-back samples adds about 9 x 5 s of
emulation.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np

from compiler.errors import QccError
from compiler.pass_manager import PassKind, Pipeline

JUDGES = ("auto", "off", "sim", "htp")
# --judge auto (qcc compile's default on a target's 8-bit pipeline): the width default against this one alone.
# Over the fetched models each is the better of the two on some (docs/measurements.md, issue 16): mse with the
# sequential correction on det and rec, percentile with the empirical one on cls and the orientation classifier.
PAIRED = ("percentile", "empirical")
JUDGED_METHODS = ("mse", "percentile", "minmax")
JUDGED_MODES = ("sequential", "empirical")
HELD_BACK_SHARE = 0.25  # of the calibration samples, when nothing else judges or evaluates
MIN_HELD_BACK_SAMPLES = 4  # a folder this small calibrates on every sample
# A challenger must beat the best so far by this many standard errors of the paired per-sample differences
# (one-sided: about a 1-in-6 chance that a candidate no better than the best wins by noise).
MARGIN_STANDARD_ERRORS = 1.0


@dataclass(frozen=True)
class Candidate:
    label: str          # e.g. "calibrate=percentile bias-correction=none"
    pipeline: Pipeline


def candidates(pipeline: Pipeline, fixed_method: str | None = None) -> list[Candidate]:
    """The pipeline as given first, then its variants along the judged axes (module docstring)."""
    calibrate = pipeline.find("calibrate")
    if calibrate is None:
        raise QccError(f"--judge chooses how a model is quantized; this pipeline does not quantize ({pipeline})")
    methods = [fixed_method] if fixed_method else _first([calibrate.options.method], JUDGED_METHODS)
    correction = pipeline.find("bias-correction")
    mixed = pipeline.find("promote-16bit") is not None
    modes = [None]
    if correction is not None:
        applicable = [m for m in JUDGED_MODES if not (mixed and m == "sequential")]
        modes = _first([correction.options.mode], applicable) + [None]
    return _variants(pipeline, [(method, mode) for method in methods for mode in modes])


def pair(pipeline: Pipeline) -> list[Candidate]:
    """``--judge auto``'s candidates: the pipeline as given and PAIRED (only the given one when it is PAIRED
    already or has no bias correction to switch)."""
    calibrate, correction = pipeline.find("calibrate"), pipeline.find("bias-correction")
    if calibrate is None or correction is None:
        return []
    given = (calibrate.options.method, correction.options.mode)
    return _variants(pipeline, [given] + ([PAIRED] if given != PAIRED else []))


def _variants(pipeline: Pipeline, choices: list[tuple]) -> list[Candidate]:
    """``pipeline`` with calibrate's method and bias-correction's mode (None: left out) of each choice."""
    calibrate, correction = pipeline.find("calibrate"), pipeline.find("bias-correction")
    result = []
    for method, mode in choices:
        passes = []
        for p in pipeline:
            if p is calibrate:
                p = type(p)(dataclasses.replace(p.options, method=method))
            elif p is correction:
                if mode is None:
                    continue
                p = type(p)(dataclasses.replace(p.options, mode=mode))
            passes.append(p)
        variant = Pipeline(passes, pipeline.config)
        variant.config_given = pipeline.config_given
        label = f"calibrate={method}" + ("" if correction is None else f" bias-correction={mode or 'none'}")
        result.append(Candidate(label, variant))
    return result


def common_prefix(pipeline: Pipeline) -> int:
    """How many leading passes every candidate shares: the float-preserving ones before the first that
    quantizes (the judged passes come after it)."""
    return next((i for i, p in enumerate(pipeline) if p.kind is not PassKind.FLOAT_PRESERVING), len(pipeline))


def count_histograms(module, calib_data, runner, bins: int) -> None:
    """Fill calibrate's statistics cache (compiler.calibration.statistics) for every activation of ``module``
    with histograms, which serve every judged method: each candidate's calibrate then reads them."""
    from compiler.calibration import activation_tensors, statistics
    statistics(module, calib_data, activation_tensors(module), "histogram", bins, runner)


def _first(given: list, others) -> list:
    return given + [o for o in others if o not in given]


# Bytes of held-back samples and their FP32 outputs kept between candidates; beyond it they are read and run
# again for each candidate, so the judge's memory does not grow with the number of samples.
HELD_BACK_MEMORY = 64 << 20


class HeldBack:
    """The held-back samples with their FP32 outputs (``reference``, a ModelProto), each computed when first
    asked for and kept while the kept ones fit in HELD_BACK_MEMORY bytes."""

    def __init__(self, samples, reference):
        self.samples, self.reference = samples, reference
        self.session, self.kept, self.bytes = None, {}, 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[dict, dict]:
        """(sample ``index``, its FP32 outputs by name)."""
        if index in self.kept:
            return self.kept[index]
        from compiler.runtime import make_session
        self.session = self.session or make_session(self.reference)
        sample = self.samples[index]
        names = [o.name for o in self.session.get_outputs()]
        pair = sample, dict(zip(names, self.session.run(names, sample)))
        size = sum(np.asarray(v).nbytes for part in pair for v in part.values())
        if self.bytes + size <= HELD_BACK_MEMORY:
            self.kept[index], self.bytes = pair, self.bytes + size
        return pair


@dataclass
class Exported:
    """What judging the chosen candidate exported and ran, for the compile to reuse instead of doing it again:
    the compiled model and the FP32 reference (ModelProtos), and their CPU outputs on the first held-back sample."""
    compiled: object
    reference: object
    first_outputs: tuple  # (compiled's outputs by name, the FP32 reference's)


def score(compiled, held: HeldBack, judge: str, arch: str | None) -> tuple:
    """(per-sample scores: the mean over outputs of ``compiled``'s (ModelProto) cosine against the FP32 outputs
    on each held-back sample, the evaluation metrics of ``compiled`` on them (layer_analysis.output_metrics),
    its outputs on the first sample), computed one sample at a time; on HTP (``judge`` "htp", generation
    ``arch``) (None, None, None) when the backend refuses the model."""
    from compiler.htp import htp_session, pinned_to_samples
    from compiler.layer_analysis import ErrorStats, Reference, output_metrics
    from compiler.runtime import make_session
    try:
        session = htp_session(pinned_to_samples(compiled, [held[0][0]]), {"htp_arch": arch}) if judge == "htp" \
            else make_session(compiled)
    except QccError:
        if judge == "htp":
            return None, None, None
        raise
    names = [o.name for o in session.get_outputs()]
    scores, first = [], []

    def pairs():
        for index in range(len(held)):
            sample, reference = held[index]
            try:
                got = dict(zip(names, session.run(names, sample)))
            except Exception as exc:
                raise QccError(f"--judge {judge}: the compiled model failed to run: {str(exc).splitlines()[0]}") from None
            cosines = []
            for name in reference:
                stats = ErrorStats()
                stats.update(Reference(reference[name]), got[name].astype(reference[name].dtype, copy=False))
                cosines.extend(stats.cosines)
            scores.append(float(np.mean(cosines)))
            if not first:
                first.append(got)
            yield reference, got

    metrics = output_metrics(pairs())
    return np.array(scores), metrics, first[0] if first else None


def beats(challenger: np.ndarray, best: np.ndarray, min_gain: float = 0.0) -> bool:
    """Whether ``challenger``'s per-sample scores beat ``best``'s on the same samples by more than the noise of
    their paired differences d, and by more than ``min_gain``: mean(d) > max(min_gain, MARGIN_STANDARD_ERRORS *
    std(d) / sqrt(n)). On a few held-back samples two close candidates swap places from one sample set to the
    next; the pipeline that came first (the width default) keeps its place unless the other wins clearly."""
    differences = challenger - best
    spread = float(np.std(differences, ddof=1)) / np.sqrt(len(differences)) if len(differences) > 1 else 0.0
    return float(np.mean(differences)) > max(min_gain, MARGIN_STANDARD_ERRORS * spread)


def choose(candidate_list: list[Candidate], run, samples, judge: str, arch: str | None, log, on_first=None) -> tuple:
    """Run (``run(pipeline)`` -> CompileResult) and score every candidate on the held-back ``samples`` (a
    Dataset or a list); (best result, report dict, the best's evaluation metrics on ``samples`` in CPU
    simulation, or None on HTP). Only the best result so far is kept, so memory holds two compiled models
    at most, and the samples with their FP32 outputs up to HELD_BACK_MEMORY bytes. ``on_first(compiled)``, when
    given, sees the first candidate's model (the default, which the others must beat) as soon as it is exported."""
    if judge == "htp":
        from compiler.htp import qnn_module
        if arch is None:
            raise QccError("--judge htp needs an HTP generation: use --target htp (or quant{htp-arch=...})")
        qnn_module()  # not installed: one line saying how to install it, before any candidate compiles
    by = f"HTP v{arch}" if judge == "htp" else "CPU simulation"
    rows, best, best_scores, best_score, start, held, metrics = [], None, None, None, time.perf_counter(), None, None
    for index, candidate in enumerate(candidate_list, 1):
        began = time.perf_counter()
        result = run(candidate.pipeline)
        scores = measured = None
        if result.reference is not None:
            # Every candidate's FP32 reference is the module the shared float rewrites left: run it once.
            held = held or HeldBack(samples, result.reference.to_onnx())
            compiled = result.module.to_onnx()
            if index == 1 and on_first is not None:
                on_first(compiled)
            scores, measured, first = score(compiled, held, judge, arch)
            if judge == "sim" and first is not None:
                result.exported = Exported(compiled, held.reference, (first, held[0][1]))
        value = None if scores is None else float(np.mean(scores))
        seconds = time.perf_counter() - began
        rows.append({"candidate": candidate.label, "pipeline": str(candidate.pipeline), "cosine": value,
                     "per_sample": None if scores is None else scores.tolist(), "seconds": round(seconds, 3)})
        shown = "refused" if value is None else f"{value:.5f}"
        log(f"judge {index}/{len(candidate_list)} ({by}): {candidate.label}: cosine {shown} ({seconds:.1f}s)")
        if value is not None and (best is None or beats(scores, best_scores)):
            best, best_scores, best_score, chosen, metrics = result, scores, value, candidate.label, measured
    if best is None:
        raise QccError(f"--judge {judge}: no candidate ran on {by}")
    report = {"by": by, "samples": len(samples), "chosen": chosen, "cosine": best_score,
              "seconds": round(time.perf_counter() - start, 3), "candidates": rows}
    return best, report, metrics if judge == "sim" else None


def judge_lines(report: dict) -> list[str]:
    return [f"judge: {report['chosen']} chosen of {len(report['candidates'])} candidates, cosine "
            f"{report['cosine']:.5f} vs FP32 on {report['samples']} held-back calibration sample(s) on "
            f"{report['by']} ({report['seconds']:.1f}s)"]
