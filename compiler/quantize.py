"""Quantized compilation end to end: data, pipeline, outputs (.onnx, .encodings, report), summary.

``qcc compile MODEL --target htp --calib-data DIR -o OUT.onnx`` writes OUT.onnx (QDQ),
OUT.encodings (AIMET/QNN JSON) and OUT.report.json (per-pass stats and timings, remarks, and with
``--eval-data`` each output's cosine and SQNR against FP32). The same flow from Python:

    result = compile_model(load("m.onnx"), "htp", calib_data=folder, image=ImageOptions(...))
    result.module, result.metrics, result.seconds

Evaluation metrics per output: cosine per sample (mean, min) and SQNR in dB over all samples
(compiler.layer_analysis.ErrorStats). A sample whose FP32 output is all ~0 (|x| < 1e-3: a detector
on an image without text) has no meaningful direction, so it is left out of the cosine and
counted; it still counts in the SQNR.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from compiler.data import Dataset, ImageOptions, specs_of
from compiler.ir import Module, QccError
from compiler.outputs import OutputSet
from compiler.pass_manager import PassContext, PassManager, make_pass, parse_pipeline
from compiler.targets import QUANT_TUNING, get_target

NEAR_ZERO = 1e-3


def add_arguments(parser) -> None:
    """The quantization flags of ``qcc compile``."""
    from compiler.calibration import METHODS
    from compiler.export import FORMATS
    group = parser.add_argument_group("quantization (targets htp, dsp, hta)")
    group.add_argument("--calib-data", metavar="DIR", help="folder of calibration samples (.npy, .npz or images)")
    group.add_argument("--calib-count", type=int, metavar="N", help="use at most N calibration samples")
    group.add_argument("--eval-data", metavar="DIR", help="held-out samples: report each output's cosine and SQNR vs FP32")
    group.add_argument("--image-mean", metavar="R,G,B", help="image normalisation (x - mean) / std on [0, 1] pixels")
    group.add_argument("--image-std", metavar="R,G,B")
    group.add_argument("--image-size", metavar="H,W", help="resize image samples to H,W (default: the input's H, W)")
    group.add_argument("--act-bits", type=int, choices=(8, 16), help="activation bit-width (target default: 8)")
    group.add_argument("--weight-bits", type=int, choices=(4, 8, 16), help="weight bit-width (target default: 8)")
    group.add_argument("--calib-method", choices=METHODS + ("auto",), help="activation range method (target default: mse at 8-bit activations, minmax at 16)")
    group.add_argument("--target-cos", type=float, metavar="COS",
                       help="mixed precision: move the activations that cost the most accuracy to 16 bits until the "
                            "output cosine vs FP32 on calibration data reaches COS (promote-16bit; e.g. 0.999)")
    group.add_argument("--max-16bit-share", type=float, metavar="SHARE",
                       help="with --target-cos: at most this share of the activations at 16 bits (default 0.25)")
    group.add_argument("--encodings-format", choices=FORMATS, default="1.0.0",
                       help="layout of OUT.encodings: AIMET 1.0.0 lists (default) or the legacy 0.6.1 dicts")


def pipeline_text(target, args) -> str:
    """--passes as given, else the target's pipeline with --act-bits/--weight-bits/--calib-method and
    --target-cos/--max-16bit-share applied."""
    if args.passes is not None:
        given = [flag for flag, value in (("--act-bits", args.act_bits), ("--weight-bits", args.weight_bits),
                                          ("--calib-method", args.calib_method), ("--target-cos", args.target_cos),
                                          ("--max-16bit-share", args.max_16bit_share)) if value is not None]
        if given:
            raise QccError(f"{', '.join(given)} set a target's defaults; with --passes, give the options in the "
                           f"pipeline (e.g. calibrate{{act-bits=16}},insert-qdq{{act-bits=16}})")
        return args.passes
    if args.max_16bit_share is not None and args.target_cos is None:
        raise QccError("--max-16bit-share needs --target-cos (the accuracy mixed precision aims for)")
    text = target.pipeline_text(act_bits=args.act_bits, weight_bits=args.weight_bits, calib_method=args.calib_method)
    if args.target_cos is None:
        return text
    return with_mixed_precision(text, args.target_cos, args.max_16bit_share)


def with_mixed_precision(text: str, target_cos: float, max_16bit_share: float | None = None) -> str:
    """A quantizing pipeline with promote-16bit (same weight options as insert-qdq) right before
    insert-qdq and insert-converts after it: HTP computes each op at one width, so the tensors that
    cross between 8 and 16 bits get explicit converts. A sequential bias correction becomes the
    float-input (empirical) one."""
    pipeline = parse_pipeline(text)
    names = [p.name for p in pipeline]
    if "insert-qdq" not in names:
        raise QccError("--target-cos: the pipeline does not quantize (no insert-qdq); use a quantized target "
                       "(htp, dsp, hta)")
    if "promote-16bit" in names:
        return text
    qdq = pipeline[names.index("insert-qdq")].options
    if qdq.act_bits != 8:
        raise QccError(f"--target-cos promotes 8-bit activations to 16 bits; with --act-bits {qdq.act_bits} "
                       "every activation already has 16 bits")
    # Sequentially corrected biases also offset the 8-bit activations' mean shifts, which are gone once an
    # activation moves to 16 bits (det W8A8 with them: 0.989 at 77 % promoted, 0.9988 without). The
    # float-input mode corrects the weights' rounding only, which the widths do not change.
    for i, p in enumerate(pipeline):
        if p.name == "bias-correction" and p.options.mode == "sequential":
            samples = int(dict(QUANT_TUNING)["bias-correction"]["samples"])
            pipeline[i] = type(p)(dataclasses.replace(p.options, mode="empirical", samples=samples))
    options = {"target-cos": str(target_cos), "weight-bits": str(qdq.weight_bits),
               "per-channel": "true" if qdq.per_channel else "false"}
    if max_16bit_share is not None:
        options["budget"] = str(max_16bit_share)
    index = names.index("insert-qdq")
    pipeline[index:index + 1] = [make_pass("promote-16bit", options), pipeline[index], make_pass("insert-converts")]
    return str(pipeline)


def image_options(args) -> ImageOptions:
    from compiler.analyze_cmd import image_options as parse
    return parse(args)


def prepare_context(module: Module, ctx: PassContext, args, pipeline) -> Module | None:
    """Attach --calib-data / --eval-data to ``ctx`` (a pipeline that calibrates needs calibration
    data); returns a copy of the float module to evaluate against when there is --eval-data."""
    image = image_options(args)
    if args.calib_data:
        ctx.calib_data = Dataset(args.calib_data, specs_of(module), count=args.calib_count, image=image)
    elif args.calib_count is not None:
        raise QccError("--calib-count needs --calib-data")
    if args.eval_data:
        ctx.eval_data = Dataset(args.eval_data, specs_of(module), image=image)
    for data in (ctx.calib_data, ctx.eval_data):
        if data is not None:
            data.check()
    if ctx.calib_data is None and any(p.name == "calibrate" for p in pipeline):
        raise QccError("the pipeline quantizes (calibrate) and needs --calib-data DIR: a folder of sample inputs "
                       "(.npy, .npz or images)")
    return module.clone() if ctx.eval_data is not None else None


@dataclass
class CompileResult:
    module: Module
    manager: PassManager
    context: PassContext
    seconds: float
    metrics: dict = field(default_factory=dict)


def compile_model(module: Module, target: str = "htp", *, calib_data=None, eval_data=None, passes: str | None = None,
                  act_bits: int | None = None, weight_bits: int | None = None, calib_method: str | None = None,
                  target_cos: float | None = None, max_16bit_share: float | None = None,
                  verify: bool = False, quiet: bool = True, log=None) -> CompileResult:
    """Run a target's pipeline (or ``passes``) on ``module`` in place; evaluate on ``eval_data`` if given.
    ``target_cos`` adds mixed precision (``with_mixed_precision``) to the target's pipeline."""
    if passes and target_cos is not None:
        raise QccError("target_cos adds mixed precision to a target's pipeline; with passes, put promote-16bit "
                       "and insert-converts in the pipeline")
    text = passes or get_target(target).pipeline_text(act_bits=act_bits, weight_bits=weight_bits, calib_method=calib_method)
    if target_cos is not None:
        text = with_mixed_precision(text, target_cos, max_16bit_share)
    pipeline = parse_pipeline(text)
    ctx = PassContext(calib_data=calib_data, eval_data=eval_data)
    if log is not None:
        ctx.log = log
    original = module.clone() if eval_data is not None else None
    manager = PassManager(pipeline, verify=verify, quiet=quiet)
    start = time.perf_counter()
    manager.run(module, ctx)
    seconds = time.perf_counter() - start
    metrics = evaluate(original, module, eval_data) if eval_data is not None else {}
    return CompileResult(module, manager, ctx, seconds, metrics)


def evaluate(reference: Module, candidate: Module, data) -> dict:
    """Per output: cosine mean/min over samples (near-zero FP32 outputs left out), SQNR dB over all."""
    from compiler.layer_analysis import ErrorStats, Reference
    from compiler.runtime import make_session
    ref_session, got_session = make_session(reference), make_session(candidate)
    names = [o.name for o in ref_session.get_outputs()]
    stats = {name: ErrorStats() for name in names}
    skipped = {name: 0 for name in names}
    count = 0
    for sample in data:
        for name, ref, got in zip(names, ref_session.run(names, sample), got_session.run(names, sample)):
            meaningful = float(np.abs(ref).max(initial=0.0)) >= NEAR_ZERO
            stats[name].update(Reference(ref.astype(np.float32)), got.astype(np.float32), with_cosine=meaningful)
            skipped[name] += not meaningful
        count += 1
    return {name: {"cosine_mean": s.cos, "cosine_min": s.cos_min, "sqnr_db": s.sqnr, "samples": count,
                   "near_zero_samples": skipped[name]} for name, s in stats.items()}


def summary_lines(metrics: dict) -> list[str]:
    lines = []
    for name, m in metrics.items():
        cos = "n/a" if m["cosine_mean"] is None else f"{m['cosine_mean']:.5f} (min {m['cosine_min']:.5f})"
        sqnr = "inf" if m["sqnr_db"] is None else f"{m['sqnr_db']:.2f} dB"
        note = f", {m['near_zero_samples']} near-zero sample(s) not in the cosine" if m["near_zero_samples"] else ""
        lines.append(f"output {name}: cosine {cos}, SQNR {sqnr} vs FP32 on {m['samples']} held-out sample(s){note}")
    return lines


def report(manager: PassManager, ctx: PassContext, seconds: float, metrics: dict, outputs: dict) -> dict:
    return {
        "pipeline": str(manager.pipeline),
        "seconds": round(seconds, 3),
        "passes": [{"name": r.name, "pipeline": r.text, "modified": r.modified, "seconds": round(r.seconds, 3),
                    "stats": r.stats, **({"verify_max_rel_diff": r.verify_error} if r.verify_error is not None else {})}
                   for r in manager.records],
        "remarks": [{"pass": r.pass_name, "where": r.where, "message": r.message} for r in ctx.remarks],
        "calibration_samples": len(ctx.calib_data) if hasattr(ctx.calib_data, "__len__") else None,
        "evaluation": metrics,
        "outputs": outputs,
    }


def plan_outputs(model_path: Path, output: Path, pipeline, args) -> OutputSet:
    """The files ``qcc compile`` may write: OUT, OUT.encodings and OUT.float.onnx (when the pipeline
    quantizes; ``plan_quantized_outputs`` adds them for a model quantized before qcc saw it),
    OUT.report.json and the --dump-after folder; the model and the data folders are inputs none of them
    may replace."""
    outputs = OutputSet(force=args.force, inputs=(model_path, args.calib_data, args.eval_data))
    outputs.add("compiled model", output)
    if any(p.name == "insert-qdq" for p in pipeline):
        plan_quantized_outputs(outputs)
    outputs.add("report", output.with_name(output.stem + ".report.json"))
    if args.dump_after:
        outputs.add("dumps", args.dump_dir or output.with_name(output.stem + ".dumps"), folder=True)
    return outputs


def plan_quantized_outputs(outputs: OutputSet) -> None:
    output = outputs.paths["compiled model"]
    outputs.add("encodings", output.with_suffix(".encodings"))
    outputs.add("float model", output.with_name(output.stem + ".float.onnx"))


def finish(original: Module, module: Module, manager: PassManager, ctx: PassContext, args, outputs: OutputSet,
           seconds: float) -> None:
    """Stage OUT.onnx, OUT.encodings when quantized, OUT.float.onnx (the float model the quantizer started
    from: the float rewrites applied, same tensors as OUT.onnx, so ``qcc analyze OUT.float.onnx OUT.onnx``
    compares like with like where CLE rescaled channels or fold-affine moved constants), OUT.report.json;
    commit them together and print the summary. Each model is checked to load in onnxruntime first."""
    from compiler.encoding import has_qdq
    from compiler.export import encodings_json
    from compiler.runtime import loadable_bytes
    names = {"model": outputs.write("compiled model", loadable_bytes(module.to_onnx(), outputs.paths["compiled model"])).name}
    if has_qdq(module.graph):
        names["encodings"] = outputs.write("encodings", encodings_json(module, args.encodings_format)).name
        if ctx.reference is not None:
            data = loadable_bytes(ctx.reference.to_onnx(), outputs.paths["float model"])
            names["float_model"] = outputs.write("float model", data).name
    metrics = evaluate(original, module, ctx.eval_data) if ctx.eval_data is not None else {}
    document = report(manager, ctx, seconds, metrics, names)
    report_path = outputs.write("report", json.dumps(document, indent=1, default=_json) + "\n")
    written = outputs.commit()
    if not args.quiet:
        for line in summary_lines(metrics):
            print(line, file=sys.stderr)
        timings = ", ".join(f"{r.name} {r.seconds:.2f}s" for r in manager.records)
        print(f"compiled in {seconds:.2f}s ({timings})", file=sys.stderr)
        print(f"wrote {', '.join(path.name for path in written)}", file=sys.stderr)


def _json(value):
    if isinstance(value, (np.generic,)):
        return value.item()
    return str(value)
