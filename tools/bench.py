#!/usr/bin/env python3
"""Benchmark qcc's htp target against onnxruntime's quantize_static on the real PP-OCR models.

One process; per model every tool gets the same float model (input shape pinned, canonicalized as
below), the same calibration samples and the same held-out samples:

- ``qcc htp W8A8`` and ``qcc htp W8A16``: the ``htp`` target through the compiler API
  (``compiler.quantize.compile_model``, ``act_bits=16`` for the second), as ``qcc compile --target htp``;
- ``ort minmax`` and ``ort percentile``: ``onnxruntime.quantization.quantize_static``, QDQ format,
  per-channel, uint8 activations, int8 weights, MinMax or Percentile calibration;
- ``ort qnn``: the same through onnxruntime's QNN helper ``get_qnn_qdq_config`` (uint8 activations,
  int8 per-channel weights, MinMax), the configuration onnxruntime recommends for its QNN EP.

The float model is the original with fold-constants, cleanup and upgrade-opset{version=13} (per-channel
QDQ needs opset 13). onnxruntime gets it as qcc does; ``quant_pre_process`` (its recommended preparation, which
folds BatchNormalization) runs first and counts in its compile time.

Data: ``text_cls/`` (48x192) and ``text_det/`` (320x320) rendered text images of the assets cache
(tools/fetch_assets.py), natural images (``images/``) when a folder is missing. Preprocessing is what
rapidocr-onnxruntime 1.4.4 (the wheel the models come from) does for both: RGB, [0, 1], ``(x - 0.5) / 0.5``,
NCHW. (PaddleOCR's own det config normalises with ImageNet's mean and std instead; measured with that,
det's inputs span [-2.1, 2.6] and W8A8 loses more: 0.954 against 0.978 with the pipeline of that day.) From file ``--offset`` on (sorted by name, wrapping
around to the first), ``--calib`` files calibrate and the next ``--eval`` files are held out: with the
64 images of the assets cache, ``--offset 32`` swaps the calibration and held-out sets of the default run
(a second fold).

Every QDQ model is evaluated on onnxruntime CPU with graph optimisations off (exact QDQ simulation,
compiler.runtime) against the float model: cosine per sample (mean and min) and SQNR in dB over the
held-out samples whose FP32 output is not ~zero (max |y| > 1e-3: the det map is ~0 on an image without
text), plus the task's measure: top-1 agreement with FP32 (cls), IoU of the maps thresholded at 0.3
(det), the share of time steps whose most likely character agrees with FP32's (rec, ``--models rec``:
the recogniser on the classifier's text lines, resized to 48x320). ``--models orient`` adds a model that is
not PP-OCR's: RapidAI's document orientation classifier (PP-LCNet, 4 classes, top-1) on the detector's
pages resized to 224x224, normalised with ImageNet's mean and std. ``qcc/ORT`` is a qcc row's compile
time over ``ort minmax``'s for the same model, both in this process. ``process qcc/ORT`` (the ``htp W8A8``
row) is the same comparison as a user sees it: ``qcc compile --target htp`` (its HTP check included) and
ORT's quant_pre_process + quantize_static MinMax, each a whole process with its imports, on the same float
model and calibration samples (tools/bench_process.py; about 10-30 s a model, ``--no-process-time`` skips it).

A variant row (``--variant SPEC``) compiles the ``htp`` target's default pipeline at one activation width
with changes; SPEC is the width, ``W8A8`` or ``W8A16``, then any of

- ``-PASS``: without PASS, one of compiler.targets.OPTIONAL_PASSES the default pipeline has (the other
  passes and their options unchanged, in order);
- ``+PASS``: with an optional PASS the default leaves out (at its place in the full pipeline);
- ``calib=METHOD``: calibrate{method=METHOD} instead of the width's default method;
- ``bias=MODE``: bias-correction in MODE, with the sample count of the width whose default uses it;
- ``cos=C`` (W8A8) and ``share=S``: mixed precision as ``qcc compile --target-cos C --max-16bit-share S``
  (promote-16bit; share defaults to promote-16bit's own); ``share=litemp``: the byte share the model's last
  ``litemp=F`` row reached, so the two compare at equal bytes (with ``cos=1``, which no point reaches, the
  budget is filled: the curve's point at that share);
- ``litemp=F`` (W8A8): the LiteMP-style baseline, promote-16bit{layers=F}: the F most sensitive share of the
  activations at 16 bits (ranked by promote-16bit's own measure), no search;
- ``judge=sim`` / ``judge=htp`` / ``judge=off``: as ``qcc compile --judge``: the calibration method and
  bias-correction mode chosen on a quarter of the calibration samples held back (``judge=htp`` on ``arch=N``,
  default 73); without it a row compiles as ``qcc compile`` does (``--judge auto``);

e.g. ``--variant "W8A8 calib=mse -cle -adaround"`` or ``--variant "W8A8 cos=0.999 share=1"``; its row's
config is ``htp SPEC``. A mixed-precision row compiles as ``qcc compile`` without --eval-data does: a quarter
of the calibration samples held back, promote-16bit choosing on them; its ``16-bit`` column is the share of
activation bytes at 16 bits.
``--ablation`` adds, for each qcc tool of ``--tools`` (qcc-w8a8, qcc-w8a16), the variants with one change:
each of fuse-hardswish, fold-affine, replace-se, cle, adaround, brecq, bias-correction toggled (``-PASS`` if the
default has it, else ``+PASS``), then each calibration method other than the default among minmax,
percentile, mse and auto, then the other data-driven bias-correction mode (empirical, sequential). A
pass's contribution is then the difference to the tool's own row (same float model, same samples, same
run). A change that does not apply (a pass not installed, ``-PASS`` for a pass
the default lacks) is an error before any work. Variants compile as the others, through
``compile_model(..., passes=TEXT)``.

Usage (from the repository root):

    python tools/bench.py [--models cls,det[,rec][,orient]] [--calib 32] [--eval 32] [--offset 0] [--htp] [--json OUT.json]
                          [--htp-arch 68,73,79] [--tools qcc-w8a8,qcc-w8a16,ort-minmax,ort-percentile,ort-qnn] [--save-dir DIR]
                          [--ablation] [--variant SPEC ...] [--no-process-time]

``--models``    which models (default cls,det)
``--calib N``   calibration samples (default 32)
``--eval N``    held-out samples (default 32; cls cosine moves by ~0.03 per flipped sample, so fewer is noisy)
``--offset N``  the first file used (default 0), see Data
``--htp``       also run every quantized model on onnxruntime-qnn's HTP backend (CPU fallback disabled)
                on --htp-samples held-out samples: cosine and max difference in output steps against CPU simulation,
                cosine against FP32. Needs ``pip install '.[qnn]'``; about a second per cls sample.
``--htp-samples N`` held-out samples run on HTP (default 2; about a second each for det)
``--htp-arch N[,N...]`` the HTP architectures the backend simulates, one column group each (e.g. 68,73,79;
                default: its own, v68; v73 and later compute 16-bit convolutions exactly, v68 only to ~20 steps)
``--tools``     a subset of the tools (default all); the qcc tools need the ``htp`` target
``--json OUT``  write every row as JSON
``--save-dir``  keep the quantized models there (default: a temporary folder)
``--ablation``  also the ablation rows above (11 compiles per model and qcc tool; +brecq needs the torch extra
                and takes about 25 s on cls, 4 minutes on det)
``--variant SPEC`` also this variant row (repeatable)
``--no-process-time`` without the whole-process column

The default run (both models, 32 + 32 samples, no --htp) took about 2 minutes on 2 shared cores;
--htp adds 2-3 minutes. Compile times vary by 2x on a busy machine; compare them within one run.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from compiler.data import Dataset, ImageOptions, specs_of  # noqa: E402
from compiler.ir import QccError, load  # noqa: E402
from compiler.layer_analysis import ErrorStats, Reference  # noqa: E402
from compiler.pass_manager import PassContext, PassManager, parse_pipeline  # noqa: E402
from compiler.runtime import run_model  # noqa: E402

ZERO_OUTPUT = 1e-3     # a held-out sample whose FP32 output stays below this everywhere is left out
DET_THRESHOLD = 0.3    # PaddleOCR's DBPostProcess binarisation threshold
# Opset 13 at least: per-channel QuantizeLinear/DequantizeLinear (onnxruntime's per_channel) needs it.
CANONICALIZE = "fold-constants,cleanup,upgrade-opset{version=13}"
RAPIDOCR = ImageOptions(mean=(0.5,) * 3, std=(0.5,) * 3)
IMAGENET = ImageOptions(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


@dataclass(frozen=True)
class BenchModel:
    name: str
    shape: list
    folder: str
    image: ImageOptions
    task: str  # "top1", "iou" or "chars"
    file: str  # under the assets' models/


MODELS = {
    "cls": BenchModel("cls", [1, 3, 48, 192], "text_cls", RAPIDOCR, "top1", "ppocr_cls.onnx"),
    "det": BenchModel("det", [1, 3, 320, 320], "text_det", RAPIDOCR, "iou", "ppocr_det.onnx"),
    # Not in the default --models: the recogniser (attention blocks) on the classifier's text lines, and
    # a document orientation classifier (PP-LCNet, not PP-OCR's) on the detector's pages, resized.
    "rec": BenchModel("rec", [1, 3, 48, 320], "text_cls", RAPIDOCR, "chars", "ppocr_rec.onnx"),
    "orient": BenchModel("orient", [1, 3, 224, 224], "text_det", IMAGENET, "top1", "doc_orientation.onnx"),
}
TASK_LABELS = {"top1": "top1", "iou": "IoU", "chars": "chars"}
QCC_TOOLS = {"qcc-w8a8": 8, "qcc-w8a16": 16}
ORT_TOOLS = ("ort-minmax", "ort-percentile", "ort-qnn")
TOOLS = tuple(QCC_TOOLS) + ORT_TOOLS
TOOL_LABELS = {"qcc-w8a8": ("qcc", "htp W8A8"), "qcc-w8a16": ("qcc", "htp W8A16"),
               "ort-minmax": ("ort", "MinMax per-ch QDQ u8/s8"), "ort-percentile": ("ort", "Percentile per-ch QDQ u8/s8"),
               "ort-qnn": ("ort", "QNN helper MinMax per-ch u8/s8")}
WIDTH_TOOLS = {"W8A8": "qcc-w8a8", "W8A16": "qcc-w8a16"}  # a --variant SPEC's first word
# --ablation: each of these passes toggled, then each of these calibration methods but the default.
ABLATED_PASSES = ("fuse-hardswish", "fold-affine", "replace-se", "cle", "adaround", "brecq", "bias-correction")
ABLATION_CALIB_METHODS = ("minmax", "percentile", "mse", "auto")
ABLATION_BIAS_MODES = ("empirical", "sequential")  # bias-correction's data-driven modes


@dataclass(frozen=True)
class Variant:
    """What one row compiles: a --tools entry, or (``passes``) a qcc tool with a variant pipeline."""
    name: str          # file names and log lines
    tool: str          # a key of TOOL_LABELS: how it compiles
    config: str
    passes: str | None = None
    judge: str | None = None  # qcc compile --judge
    share_from_litemp: bool = False  # promote-16bit's budget: the byte share of the model's last litemp=F row
    eight_bit: str | None = None  # what a mixed compile compiles instead when it promotes nothing (with_mixed_precision)

    @classmethod
    def of_tool(cls, tool: str) -> "Variant":
        return cls(tool, tool, TOOL_LABELS[tool][1])


@dataclass
class Row:
    model: str
    tool: str
    config: str
    compile_seconds: float | None = None
    cos_mean: float | None = None
    cos_min: float | None = None
    sqnr_db: float | None = None
    task_metric: float | None = None
    task: str = ""
    samples: int = 0
    ratio_to_ort: float | None = None
    share_16bit: float | None = None  # promote-16bit's share of activation bytes at 16 bits
    # The default W8A8 row: whole-process times of `qcc compile --target htp` and of ORT's quantize_static
    # (tools/bench_process.py), {"qcc": Timing, "ort": Timing}.
    process: dict = field(default_factory=dict)
    htp: dict = field(default_factory=dict)
    error: str = ""


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# --- data and models -------------------------------------------------------------------------------

def prepare(model: BenchModel, assets: Path, work: Path, calib: int, held: int, offset: int = 0):
    """(float model path, calibration samples, held-out samples); the files from the ``offset``-th on."""
    module = load(assets / "models" / model.file, {"x": model.shape})
    PassManager(parse_pipeline(CANONICALIZE), quiet=True).run(module, PassContext(log=lambda m: None))
    float_path = work / f"{model.name}.fp32.onnx"
    onnx.save(module.to_onnx(), float_path)
    folder = assets / model.folder
    if not folder.is_dir():
        log(f"{folder} missing: using the natural images in {assets / 'images'}")
        folder = assets / "images"
    files = Dataset(folder, specs_of(module), image=model.image).files
    try:
        chosen = fold_files(files, calib, held, offset)
    except ValueError as exc:
        raise SystemExit(f"bench: {folder}: {exc} (python tools/fetch_assets.py --count N renders more)")
    samples = list(Dataset(None, specs_of(module), image=model.image, files=chosen))
    return float_path, samples[:calib], samples[calib:]


def fold_files(files: list, calib: int, held: int, offset: int) -> list:
    """The ``calib`` calibration then ``held`` held-out files, from the ``offset``-th on, wrapping around."""
    if len(files) < calib + held or offset >= len(files):
        raise ValueError(f"{len(files)} samples: --calib {calib} + --eval {held} need {calib + held}, "
                         f"--offset {offset} must be below {len(files)}")
    return (files[offset:] + files[:offset])[:calib + held]


# --- tools ------------------------------------------------------------------------------------------

def require_htp_target() -> None:
    from compiler.targets import TARGETS
    if "htp" not in TARGETS:
        raise SystemExit("bench: qcc has no 'htp' target yet (compiler/targets.py has "
                         f"{', '.join(TARGETS)}); run the onnxruntime peers alone with --tools {','.join(ORT_TOOLS)}")


def variant(spec: str) -> Variant:
    """The qcc row of a --variant SPEC (see the module docstring), its pipeline checked before any work."""
    require_htp_target()
    from compiler.pass_manager import load_passes
    from compiler.quantize import with_mixed_precision
    from compiler.targets import OPTIONAL_PASSES, TARGETS, width_defaults
    width, *changes = spec.split() or [""]
    if width.upper() not in WIDTH_TOOLS:
        raise QccError(f"variant '{spec}': starts with the width, one of {', '.join(WIDTH_TOOLS)}")
    tool = WIDTH_TOOLS[width.upper()]
    bits = QCC_TOOLS[tool]
    installed = load_passes()
    left_out, method, slug = set(width_defaults(bits).left_out), None, tool
    mixed, tuning, judge, arch, share_from_litemp = {}, {}, None, None, False
    for change in changes:
        sign, name = change[:1], change[1:]
        if change in ("judge=sim", "judge=htp", "judge=off"):
            judge = change.split("=")[1]
            slug += f"-judge-{judge}"
        elif change.startswith("arch="):
            arch = change.split("=", 1)[1]
            slug += f"-v{arch}"
        elif change.startswith("calib="):
            method = change.split("=", 1)[1]
            slug += f"-calib-{method}"
        elif change.startswith("bias="):
            tuning["bias-correction"] = bias_correction_options(change.split("=", 1)[1])
            slug += f"-bias-{tuning['bias-correction']['mode']}"
        elif change == "share=litemp":
            share_from_litemp = True
            slug += "-share-litemp"
        elif change.split("=", 1)[0] in ("cos", "share", "litemp") and "=" in change:
            key, value = change.split("=", 1)
            try:
                mixed[key] = float(value)
            except ValueError:
                raise QccError(f"variant '{spec}': '{change}' needs a number") from None
            slug += f"-{key}-{value}"
        elif sign in "+-" and name in OPTIONAL_PASSES:
            if name not in installed:
                raise QccError(f"variant '{spec}': pass '{name}' is not installed")
            if (sign == "-") == (name in left_out):
                raise QccError(f"variant '{spec}': the {width.upper()} pipeline "
                               f"{'has no' if sign == '-' else 'already has'} pass '{name}'")
            left_out ^= {name}
            slug += f"-{'no' if sign == '-' else 'with'}-{name}"
        else:
            raise QccError(f"variant '{spec}': '{change}' is none of calib=METHOD, bias=MODE, -PASS, +PASS, cos=C, "
                           f"share=S|litemp, litemp=F, judge=sim|htp, arch=N (optional passes: {', '.join(OPTIONAL_PASSES)})")
    # An unknown calibration method fails here, not after the first compiles.
    pipeline = TARGETS["htp"].build(act_bits=bits, calib_method=method, left_out=frozenset(left_out), tuning=tuning,
                                    htp_arch=arch)
    if "litemp" in mixed and ({"cos", "share"} & set(mixed) or share_from_litemp):
        raise QccError(f"variant '{spec}': litemp=F is a fixed share of the layers; it takes no cos=C or share=S")
    if (mixed or share_from_litemp) and "cos" not in mixed and "litemp" not in mixed:
        raise QccError(f"variant '{spec}': share=S needs cos=C (the accuracy mixed precision aims for)")
    if mixed:
        pipeline = with_mixed_precision(pipeline, mixed.get("cos"), mixed.get("share"), mixed.get("litemp"))
    eight_bit = getattr(pipeline, "eight_bit", None)
    return Variant(slug, tool, f"htp {' '.join([width.upper(), *changes])}", str(pipeline), judge, share_from_litemp,
                   str(eight_bit) if eight_bit is not None else None)


def with_budget(passes: str, share: float) -> str:
    """The pipeline text ``passes`` with promote-16bit's budget set to ``share``."""
    from compiler.pass_manager import Pipeline, parse_pipeline
    pipeline = parse_pipeline(passes)
    return str(Pipeline([type(p)(dataclasses.replace(p.options, budget=share)) if p.name == "promote-16bit" else p
                         for p in pipeline], pipeline.config))


def bias_correction_options(mode: str) -> dict:
    """bias-correction's options for ``mode`` as the width default that uses that mode has them (sequential
    at W8A8 runs on 4 samples, empirical at W8A16 on 8), so a bias=MODE row changes the mode and its sample
    count together; just the mode for a mode no default uses."""
    from compiler.targets import QUANT_TUNING, WIDTH_DEFAULTS
    for defaults in WIDTH_DEFAULTS.values():
        options = {**dict(QUANT_TUNING)["bias-correction"], **defaults.tuning.get("bias-correction", {})}
        if options.get("mode", "empirical") == mode:
            return {**options, "mode": mode}
    return {"mode": mode}


def ablation_specs(tools: list[str]) -> list[str]:
    """The --ablation variant SPECs for the qcc tools among ``tools``: each ABLATED_PASSES toggled, then each
    other calibration method."""
    require_htp_target()
    from compiler.targets import TARGETS, width_defaults
    specs = []
    for width, tool in WIDTH_TOOLS.items():
        if tool not in tools:
            continue
        bits = QCC_TOOLS[tool]
        in_default = {p.name for p in TARGETS["htp"].build(act_bits=bits)}
        specs += [f"{width} {'-' if name in in_default else '+'}{name}" for name in ABLATED_PASSES]
        specs += [f"{width} calib={method}" for method in ABLATION_CALIB_METHODS
                  if method != width_defaults(bits).calib_method]
        default_bias = width_defaults(bits).tuning.get("bias-correction", {}).get("mode", "empirical")
        specs += [f"{width} bias={mode}" for mode in ABLATION_BIAS_MODES if mode != default_bias]
    return specs


def run_qcc(float_path: Path, out: Path, calib: list[dict], act_bits: int, shape: list,
            passes: str | None = None, judge: str | None = None, eight_bit: str | None = None) -> dict:
    """The htp target at ``act_bits`` activations, or the pipeline ``passes`` instead; ``judge`` as --judge, by
    default qcc compile's (auto: at W8A8 a quarter of the calibration samples is held back to choose on; with
    promote-16bit, as qcc compile without --eval-data, too); ``eight_bit``: the pipeline a mixed one compiles
    instead when it promotes nothing, as qcc compile --target-cos does. Returns promote-16bit's record, if it ran."""
    from compiler.quantize import compile_model
    require_htp_target()
    module = load(float_path, {"x": shape})
    pipeline = {"passes": passes} if passes else {"act_bits": act_bits}
    if passes and eight_bit:
        pipeline["pipeline"] = parse_pipeline(passes)
        pipeline["pipeline"].eight_bit = parse_pipeline(eight_bit)
    mixed = bool(passes) and "promote-16bit" in passes
    result = compile_model(module, "htp", calib_data=calib, log=lambda m: None, judge=judge or "auto",
                           hold_back=mixed, **pipeline)
    onnx.save(result.module.to_onnx(), out)
    # promote-16bit leaves no record when the 8-bit model meets its target already: nothing at 16 bits.
    return result.module.cache.get("promote-16bit", {"share_16bit": 0.0} if mixed else {})


class _Reader:
    """onnxruntime's CalibrationDataReader over a list of samples."""

    def __init__(self, samples: list[dict]):
        self._samples = iter(samples)

    def get_next(self):
        return next(self._samples, None)


def run_ort(tool: str, float_path: Path, out: Path, calib: list[dict]) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    prepared = out.with_suffix(".pre.onnx")
    quant_pre_process(str(float_path), str(prepared))
    if tool == "ort-qnn":
        from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config
        config = get_qnn_qdq_config(str(prepared), _Reader(calib), calibrate_method=CalibrationMethod.MinMax,
                                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
        quantize(str(prepared), str(out), config)
        return
    method = CalibrationMethod.Percentile if tool == "ort-percentile" else CalibrationMethod.MinMax
    quantize_static(str(prepared), str(out), _Reader(calib), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=method)


# --- metrics ----------------------------------------------------------------------------------------

def kept_samples(reference: list[dict]) -> list[int]:
    return [i for i, outputs in enumerate(reference)
            if max(float(np.max(np.abs(v))) for v in outputs.values()) > ZERO_OUTPUT]


def accuracy(reference: list[dict], candidate: list[dict], keep: list[int], task: str) -> dict:
    name = next(iter(reference[0]))
    stats = ErrorStats()
    for i in keep:
        stats.update(Reference(reference[i][name]), candidate[i][name])
    if task == "top1":
        agree = [int(np.argmax(reference[i][name])) == int(np.argmax(candidate[i][name])) for i in keep]
        task_value = float(np.mean(agree)) if agree else None
    elif task == "chars":  # the greedy CTC decode's character per time step, as rec's FP32 output picks it
        agree = [np.mean(np.argmax(reference[i][name], axis=-1) == np.argmax(candidate[i][name], axis=-1)) for i in keep]
        task_value = float(np.mean(agree)) if agree else None
    else:
        ref = np.concatenate([(reference[i][name] > DET_THRESHOLD).ravel() for i in keep])
        got = np.concatenate([(candidate[i][name] > DET_THRESHOLD).ravel() for i in keep])
        union = np.logical_or(ref, got).sum()
        task_value = float(np.logical_and(ref, got).sum() / union) if union else None
    return {"cos_mean": stats.cos, "cos_min": stats.cos_min, "sqnr_db": stats.sqnr, "task_metric": task_value}


def htp_agreement(model: onnx.ModelProto, samples: list[dict], cpu: list[dict], fp32: list[dict],
                  arch: str | None) -> dict:
    from compiler.htp import compare_outputs, output_steps, run_htp
    try:
        outputs, seconds = run_htp(model, samples, {"htp_arch": arch} if arch else None)
    except QccError as exc:
        return {"error": str(exc)}
    (vs_cpu,) = compare_outputs(cpu, outputs, output_steps(model))
    (vs_fp32,) = compare_outputs(fp32, outputs)
    return {"cos_vs_cpu": vs_cpu.cos_mean, "max_steps_vs_cpu": vs_cpu.max_steps, "sqnr_vs_cpu": vs_cpu.sqnr_db,
            "cos_vs_fp32": vs_fp32.cos_mean, "seconds_per_sample": seconds}


# --- the run ----------------------------------------------------------------------------------------

def bench_model(model: BenchModel, variants: list[Variant], args, assets: Path, work: Path) -> list[Row]:
    log(f"{model.name}: preparing the float model and {args.calib} + {args.eval} samples from file {args.offset} on")
    float_path, calib, held = prepare(model, assets, work, args.calib, args.eval, args.offset)
    fp32 = run_model(onnx.load(float_path), held)
    keep = kept_samples(fp32)
    log(f"{model.name}: {len(keep)} of {len(held)} held-out samples have a non-zero FP32 output")
    rows = []
    for variant in variants:
        tool = variant.tool
        row = Row(model.name, TOOL_LABELS[tool][0], variant.config, task=model.task, samples=len(keep))
        out = work / f"{model.name}.{variant.name}.onnx"
        log(f"{model.name}: {variant.name} ...")
        start = time.perf_counter()
        try:
            if tool in QCC_TOOLS:
                passes = variant.passes
                if variant.share_from_litemp:
                    litemp = [r for r in rows if r.share_16bit is not None and "litemp=" in r.config]
                    if not litemp:
                        raise QccError(f"variant '{variant.config}': share=litemp needs a litemp=F row before it")
                    passes = with_budget(passes, litemp[-1].share_16bit)
                    row.config += f" ({litemp[-1].share_16bit:.3f})"
                promoted = run_qcc(float_path, out, calib, QCC_TOOLS[tool], model.shape, passes, variant.judge,
                                   variant.eight_bit)
                row.share_16bit = promoted.get("share_16bit")
            else:
                # onnxruntime's calibrators print progress on stdout, where the table goes.
                with contextlib.redirect_stdout(sys.stderr):
                    run_ort(tool, float_path, out, calib)
        except QccError as exc:
            row.error = str(exc)
            rows.append(row)
            log(f"{model.name}: {variant.name} failed: {exc}")
            continue
        row.compile_seconds = time.perf_counter() - start
        quantized = onnx.load(out)
        outputs = run_model(quantized, held)
        for key, value in accuracy(fp32, outputs, keep, model.task).items():
            setattr(row, key, value)
        if args.htp:
            first = keep[:args.htp_samples] or list(range(min(args.htp_samples, len(held))))
            row.htp = {arch or "default": htp_agreement(quantized, [held[i] for i in first], [outputs[i] for i in first],
                                                        [fp32[i] for i in first], arch) for arch in args.htp_archs}
        log(f"{model.name}: {variant.name} {row.compile_seconds:.1f}s cos {row.cos_mean:.5f}")
        rows.append(row)
    if args.process_time and "qcc-w8a8" in [v.name for v in variants]:
        from tools import bench_process
        log(f"{model.name}: whole processes, qcc compile --target htp and ORT quantize_static ...")
        seconds = bench_process.process_seconds(float_path, bench_process.write_samples(calib, work / f"{model.name}_calib"),
                                                work, runs=("qcc", "ort"))
        next(r for r in rows if r.config == TOOL_LABELS["qcc-w8a8"][1] and r.tool == "qcc").process = seconds
    ort_seconds = next((r.compile_seconds for r in rows if r.tool == "ort" and r.config.startswith("MinMax")), None)
    for r in rows:
        if r.tool == "qcc" and r.compile_seconds and ort_seconds:
            r.ratio_to_ort = r.compile_seconds / ort_seconds
    return rows


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def process_ratio(process: dict) -> str:
    """'1.23 (4.1/3.3 s)': qcc's whole process over ORT's, and the two times."""
    if not process:
        return "-"
    qcc, ort = process["qcc"].wall, process["ort"].wall
    return f"{qcc / ort:.2f} ({qcc:.1f}/{ort:.1f} s)"


def render(rows: list[Row], htp_archs: list) -> str:
    """The table; with ``htp_archs`` (--htp), per generation: HTP vs the CPU simulation (cosine, largest
    difference in output steps) and HTP vs FP32."""
    wide = max([32] + [len(r.config) + 2 for r in rows])  # variant configs can be long
    name = max([6] + [len(r.model) + 1 for r in rows])
    head = (f"{'model':<{name}}{'tool':<5}{'config':<{wide}}{'compile s':>10}{'16-bit':>7}{'cos mean':>10}{'cos min':>10}{'SQNR dB':>9}"
            f"{'task':>12}{'qcc/ORT':>9}{'process qcc/ORT':>22}")
    for arch in htp_archs:
        label = f"v{arch} " if arch else "HTP "
        head += f"  {label + 'cos/CPU':>11}{'steps':>7}{label + 'cos/FP32':>13}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.error:
            lines.append(f"{r.model:<{name}}{r.tool:<5}{r.config:<{wide}}  failed: {r.error}")
            continue
        task = f"{TASK_LABELS.get(r.task, r.task)} {_fmt(r.task_metric, '.3f')}"
        line = (f"{r.model:<{name}}{r.tool:<5}{r.config:<{wide}}{_fmt(r.compile_seconds, '.1f'):>10}{_fmt(r.share_16bit, '.3f'):>7}{_fmt(r.cos_mean, '.5f'):>10}"
                f"{_fmt(r.cos_min, '.5f'):>10}{_fmt(r.sqnr_db, '.1f', 'inf'):>9}{task:>12}{_fmt(r.ratio_to_ort, '.2f'):>9}"
                f"{process_ratio(r.process):>22}")
        for arch in htp_archs:
            htp = r.htp.get(arch or "default", {})
            if "error" in htp:
                # The cause is at the end of the message ("... likely cause, float tensors ...: Div ...").
                line += f"  HTP refused: {htp['error'].split('likely cause, ')[-1][:100]}"
            else:
                line += (f"  {_fmt(htp.get('cos_vs_cpu'), '.5f'):>11}{_fmt(htp.get('max_steps_vs_cpu'), '.0f'):>7}"
                         f"{_fmt(htp.get('cos_vs_fp32'), '.5f'):>13}")
        lines.append(line)
    return "\n".join(lines) + "\n"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="cls,det")
    p.add_argument("--calib", type=int, default=32)
    p.add_argument("--eval", type=int, default=32)
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--htp", action="store_true")
    p.add_argument("--htp-arch", metavar="N")
    p.add_argument("--htp-samples", type=int, default=2, metavar="N")
    p.add_argument("--tools", default=",".join(TOOLS))
    p.add_argument("--json", metavar="OUT.json")
    p.add_argument("--save-dir", metavar="DIR")
    p.add_argument("--ablation", action="store_true")
    p.add_argument("--variant", action="append", default=[], metavar="SPEC")
    p.add_argument("--no-process-time", dest="process_time", action="store_false")
    args = p.parse_args(argv)
    args.model_list = [m.strip() for m in args.models.split(",") if m.strip()]
    args.tool_list = [t.strip() for t in args.tools.split(",") if t.strip()]
    for name in args.model_list:
        if name not in MODELS:
            p.error(f"--models: unknown model '{name}' (known: {', '.join(MODELS)})")
    for tool in args.tool_list:
        if tool not in TOOLS:
            p.error(f"--tools: unknown tool '{tool}' (known: {', '.join(TOOLS)})")
    args.htp_archs = [a.strip() for a in args.htp_arch.split(",")] if args.htp_arch else [None]
    if any(a is not None and not a.isdigit() for a in args.htp_archs):
        p.error(f"--htp-arch '{args.htp_arch}': expected numbers such as 68,73,79")
    if args.calib <= 0 or args.eval <= 0:
        p.error("--calib and --eval must be positive")
    if args.offset < 0:
        p.error("--offset must not be negative")
    if args.ablation and not set(args.tool_list) & set(QCC_TOOLS):
        p.error(f"--ablation ablates the qcc tools of --tools; it has none of {', '.join(QCC_TOOLS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if any(t in QCC_TOOLS for t in args.tool_list):
        require_htp_target()  # fail before any work
    variants = [Variant.of_tool(t) for t in args.tool_list]
    specs = (ablation_specs(args.tool_list) if args.ablation else []) + args.variant
    try:
        variants += [variant(spec) for spec in specs]
    except QccError as exc:
        raise SystemExit(f"bench: {exc}")
    if args.htp:
        from compiler.htp import htp_devices
        try:
            htp_devices()
        except QccError as exc:
            raise SystemExit(f"bench: --htp: {exc}")
    from tools.fetch_assets import fetch
    assets = fetch()
    rows = []
    with tempfile.TemporaryDirectory(prefix="qcc-bench-") as tmp:
        work = Path(args.save_dir) if args.save_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in args.model_list:
            rows += bench_model(MODELS[name], variants, args, assets, work)
    sys.stdout.write(render(rows, args.htp_archs if args.htp else []))
    if args.json:
        Path(args.json).write_text(json.dumps({"calib": args.calib, "eval": args.eval, "offset": args.offset,
                                               "rows": [dataclasses.asdict(r) for r in rows]}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
