"""Quantized compilation end to end: data, pipeline, outputs (.onnx, .encodings, report), summary.

``qcc compile MODEL --target htp --calib-data DIR -o OUT.onnx`` writes OUT.onnx (QDQ),
OUT.encodings (AIMET/QNN JSON) and OUT.report.json (per-pass stats and timings, remarks, and with
``--eval-data`` each output's cosine and SQNR against FP32). The same flow from Python:

    result = compile_model(load("m.onnx"), "htp", calib_data=folder, image=ImageOptions(...))
    result.module, result.metrics, result.seconds

``compile_file`` is ``qcc compile``: the same run, with the outputs checked before and written after it.

Evaluation metrics per output: cosine per sample (mean, min) and SQNR in dB over all samples
(compiler.layer_analysis.ErrorStats). A sample whose FP32 output is all ~0 (|x| < 1e-3: a detector
on an image without text) has no meaningful direction, so it is left out of the cosine and
counted; it still counts in the SQNR.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from compiler.data import Dataset, ImageOptions, specs_of
from compiler.encoding import HTP_ARCHS
from compiler.ir import Module, QccError
from compiler.outputs import OutputSet
from compiler.pass_manager import PassContext, PassManager, Pipeline, check_contracts, make_pass, parse_pipeline
from compiler.targets import QUANT_TUNING, get_target


def build_pipeline(request: "CompileRequest") -> Pipeline:
    """--passes as given (--act-bits/--weight-bits set its quantization config unless its text has one),
    else the target's pipeline with --act-bits/--weight-bits/--calib-method and --target-cos /
    --max-16bit-share applied."""
    if request.passes is not None:
        given = [flag for flag, value in (("--calib-method", request.calib_method), ("--target-cos", request.target_cos),
                                          ("--max-16bit-share", request.max_16bit_share)) if value is not None]
        if given:
            raise QccError(f"{', '.join(given)} set a target's defaults; with --passes, give the options in the "
                           f"pipeline (e.g. calibrate{{method=minmax}},promote-16bit{{target-cos=0.999}})")
        pipeline = parse_pipeline(request.passes)
        given = {key: value for key, value in (("act_bits", request.act_bits), ("weight_bits", request.weight_bits),
                                               ("htp_arch", config_arch(request.htp_arch))) if value is not None}
        if given and pipeline.config_given:
            raise QccError("--act-bits/--weight-bits/--htp-arch and the pipeline's quant{...} both set the config; "
                           "give it once")
        pipeline.config = dataclasses.replace(pipeline.config, **given)
        return pipeline
    if request.max_16bit_share is not None and request.target_cos is None:
        raise QccError("--max-16bit-share needs --target-cos (the accuracy mixed precision aims for)")
    pipeline = get_target(request.target).build(act_bits=request.act_bits, weight_bits=request.weight_bits,
                                                calib_method=request.calib_method, htp_arch=config_arch(request.htp_arch))
    if request.target_cos is None:
        return pipeline
    return with_mixed_precision(pipeline, request.target_cos, request.max_16bit_share)


ALL_ARCHS = "all"


def config_arch(htp_arch: str | None) -> str | None:
    """The config's generation for --htp-arch: ``all`` compiles by the oldest one's rules (it must run on every one)."""
    return min(HTP_ARCHS, key=int) if htp_arch == ALL_ARCHS else htp_arch


def with_mixed_precision(pipeline: Pipeline, target_cos: float | None, max_16bit_share: float | None = None,
                         layers: float | None = None) -> Pipeline:
    """A quantizing pipeline with promote-16bit right before insert-qdq and insert-converts after it: HTP
    computes each op at one width, so the tensors that cross between 8 and 16 bits get explicit converts.
    A sequential bias correction becomes the float-input (empirical) one; the result's ``eight_bit`` is then
    ``pipeline``, which compile_model compiles instead when promote-16bit keeps every activation at 8 bits.
    ``layers``: promote-16bit's LiteMP-style fixed share of the activations instead of a target (``target_cos`` None)."""
    names = [p.name for p in pipeline]
    if "insert-qdq" not in names:
        raise QccError("--target-cos: the pipeline does not quantize (no insert-qdq); use a quantized target "
                       "(htp, dsp, hta)")
    if "promote-16bit" in names:
        return pipeline
    if pipeline.config.act_bits != 8:
        raise QccError(f"--target-cos promotes 8-bit activations to 16 bits; with --act-bits {pipeline.config.act_bits} "
                       "every activation already has 16 bits")
    result = Pipeline(pipeline, pipeline.config)
    # Sequentially corrected biases also offset the 8-bit activations' mean shifts, which are gone once an
    # activation moves to 16 bits (docs/measurements.md). The float-input mode corrects the weights'
    # rounding only, which the widths do not change.
    for i, p in enumerate(result):
        if p.name == "bias-correction" and p.options.mode == "sequential":
            samples = int(dict(QUANT_TUNING)["bias-correction"]["samples"])
            result[i] = type(p)(dataclasses.replace(p.options, mode="empirical", samples=samples))
    given = (("target-cos", target_cos), ("budget", max_16bit_share), ("layers", layers))
    options = {key: str(value) for key, value in given if value is not None}
    index = names.index("insert-qdq")
    result[index:index + 1] = [make_pass("promote-16bit", options), result[index], make_pass("insert-converts")]
    check_contracts(result)
    result.eight_bit = pipeline if result.find("bias-correction") is not pipeline.find("bias-correction") else None
    return result


def _promoted_nothing(result: "CompileResult") -> bool:
    """Whether promote-16bit ran and left every activation at 8 bits."""
    record = next((r for r in result.manager.records if r.name == "promote-16bit"), None)
    return record is not None and not record.modified and record.stats.get("share-16bit") == 0


@dataclass(frozen=True)
class CompileRequest:
    """Everything ``qcc compile`` takes besides the model and the output path, as Python values. Data
    is a folder path or a Dataset (or any iterable of input dicts, from Python)."""
    target: str = "cpu"
    passes: str | None = None
    act_bits: int | None = None
    weight_bits: int | None = None
    calib_method: str | None = None
    target_cos: float | None = None
    max_16bit_share: float | None = None
    calib_data: object = None
    calib_count: int | None = None
    eval_data: object = None
    image: ImageOptions = ImageOptions()
    input_shapes: dict = field(default_factory=dict)
    verify: bool = False
    dump_after: str | None = None
    dump_dir: Path | None = None
    encodings_format: str = "1.0.0"
    quiet: bool = True
    htp_arch: str | None = None  # an HTP generation, or "all" (the rules of the oldest, checked on every one)
    htp_check: bool = True       # run the written model on the HTP backend (compile_file, when it is installed)
    htp_samples: int = 1
    htp_search: bool = False     # where HTP loses accuracy the simulation promised, search layer by layer where
    profile: bool = False        # print where the time went (compile_file)
    # "sim" or "htp": choose calibration method and bias-correction mode (compiler.judge); "auto" (qcc compile's
    # default): between the 8-bit default and one alternative, where it applies; None or "off": no choice.
    judge: str | None = None
    hold_back: bool = False      # keep every 4th calibration sample for evaluation and the HTP check (qcc compile)
    workers: int | None = None   # run the units of work as Ray tasks on a local Ray of this many workers
    ray_address: str | None = None  # ... or on the Ray cluster at this address (compiler.cluster)

    def pipeline(self) -> Pipeline:
        pipeline = build_pipeline(self)
        if self.dump_after and self.dump_after != "all" and self.dump_after not in {p.name for p in pipeline}:
            raise QccError(f"--dump-after: pass '{self.dump_after}' is not in the pipeline ({pipeline})")
        return pipeline


@dataclass
class CompileResult:
    module: Module
    manager: PassManager
    context: PassContext
    seconds: float
    metrics: dict = field(default_factory=dict)
    # The module before the first pass that changes float outputs: what OUT.float.onnx holds.
    reference: Module | None = None
    # The written model on the HTP backend (compile_file): one htp.device_checks entry per generation, or why none ran.
    htp: dict = field(default_factory=dict)
    # Wall-clock seconds of each stage outside the passes (load, evaluation, HTP check, each write), in order.
    timings: dict = field(default_factory=dict)
    judge: dict = field(default_factory=dict)  # compiler.judge.choose's report, when --judge chose the pipeline
    held_back: int = 0  # calibration samples held back (for the judge, evaluation and the HTP check)
    exported: "judge.Exported | None" = None  # what the judge exported and ran of this result, when it chose it


def _dataset(data, module: Module, request: CompileRequest, count: int | None = None):
    """A folder (path) becomes a Dataset checked against the module's inputs, every sample's header read
    now so that a bad one is reported before any pass; other data (a Dataset, a list of dicts) is used as is."""
    if not isinstance(data, (str, Path)):
        return data if count is None else list(data)[:count]
    dataset = Dataset(data, specs_of(module), count=count, image=request.image)
    dataset.check()
    return dataset


def compile_model(module: Module, target: str = "htp", *, log=None, dump_dir: Path | None = None,
                  request: CompileRequest | None = None, pipeline: Pipeline | None = None, runner=None,
                  on_first_candidate=None, **options) -> CompileResult:
    """Run a target's pipeline (or ``passes``) on ``module`` in place and evaluate on ``eval_data`` if given;
    ``options`` are CompileRequest's fields (``target_cos`` adds mixed precision, ``with_mixed_precision``).
    With ``hold_back``, or a ``judge`` that applies, every 4th calibration sample is held back (compiler.judge):
    the judge's samples, and the evaluation's when no ``eval_data`` is given. When a judge runs, each candidate
    pipeline runs on a copy of ``module`` and the result is the chosen one's (``module`` is left as it was).
    Writes nothing but ``dump_dir`` (the --dump-after dumps); ``pipeline`` is the request's, when the caller has
    parsed it already; ``runner`` runs the units of work (compiler.cluster; default: this process);
    ``on_first_candidate(compiled)``: judge.choose's ``on_first``. ``qcc compile`` and the Python API both run this."""
    from compiler.cluster import LocalRunner
    runner = runner or LocalRunner()
    request = request or CompileRequest(target=target, **options)
    if request.passes is not None and request.target_cos is not None:
        raise QccError("target_cos adds mixed precision to a target's pipeline; with passes, put promote-16bit "
                       "and insert-converts in the pipeline")
    pipeline = pipeline if pipeline is not None else request.pipeline()
    # with_mixed_precision's pipeline traded the sequential bias correction for the float-input one: the 8-bit
    # pipeline to compile instead when promote-16bit keeps every activation at 8 bits.
    eight_bit = getattr(pipeline, "eight_bit", None)
    started = time.perf_counter()
    say = log or ((lambda message: print(message, file=sys.stderr)) if not request.quiet else (lambda message: None))
    calib, held, judging = _calibration_samples(module, request, pipeline)
    eval_data = _dataset(request.eval_data, module, request) if request.eval_data is not None else held
    if calib is None and any(p.name == "calibrate" for p in pipeline):
        raise QccError("the pipeline quantizes (calibrate) and needs --calib-data DIR: a folder of sample inputs "
                       "(.npy, .npz or images)")
    # Judged candidates run on copies, so the module given stays the FP32 model to evaluate against.
    original = module if judging is not None else module.clone() if eval_data is not None else None
    # What the 8-bit pipeline would compile instead: the module as given (judged candidates run on copies).
    pristine = (original if original is not None else module.clone()) if eight_bit is not None else None
    judged_metrics = None  # the chosen candidate's metrics on the held-back samples, when the judge has them

    def run(candidate: Pipeline, target_module: Module, dumps: Path | None, after: CompileResult | None = None):
        """``candidate`` on ``target_module``; ``after``: the run of its first passes, which it goes on from."""
        ctx = PassContext(verbose=not request.quiet, calib_data=calib, eval_data=eval_data, judge_data=held, runner=runner,
                          remarks=list(after.context.remarks) if after else [])
        if log is not None:
            ctx.log = log
        manager = PassManager(candidate, verify=request.verify, dump_after=request.dump_after, dump_dir=dumps,
                              quiet=request.quiet)
        manager.records = list(after.manager.records) if after else []
        start = time.perf_counter()
        manager.run(target_module, ctx, first=len(after.manager.pipeline) if after else 0)
        seconds = time.perf_counter() - start + (after.seconds if after else 0.0)
        return CompileResult(target_module, manager, ctx, seconds, reference=ctx.reference)

    if judging is None:
        result = run(pipeline, module, dump_dir)
    else:
        from compiler import judge
        arch = pipeline.config.htp_arch if pipeline.config.htp_arch in HTP_ARCHS else None
        # The candidates differ from the first quantizing pass on: the float rewrites run once, and calibrate's
        # histograms (which serve every method) are counted once, on the module every candidate copies.
        judging_started = time.perf_counter()
        candidates = judge.pair(pipeline) if judging == "auto" else judge.candidates(pipeline, request.calib_method)
        common = Pipeline(pipeline[:judge.common_prefix(pipeline)], pipeline.config)
        base = run(common, module.clone(), None)
        judge.count_histograms(base.module, calib, runner, pipeline.find("calibrate").options.bins)
        result, result.judge, judged_metrics = judge.choose(
            candidates, lambda candidate: run(candidate, base.module.clone(), None, base), held,
            "sim" if judging == "auto" else judging, arch, say, on_first_candidate)
        # What the judge measured is the time spent beside the chosen candidate's passes.
        result.timings["judge (histograms, other candidates, scoring)"] = time.perf_counter() - judging_started - result.seconds
    if eight_bit is not None and _promoted_nothing(result):
        # The 8-bit pipeline is then the cheapest point, and with its own bias correction the more accurate one
        # (cls held-out: 0.99836 against 0.99776, docs/measurements.md).
        say("--target-cos: promote-16bit keeps every activation at 8 bits; compiling the 8-bit pipeline as it is")
        spent = time.perf_counter() - started
        plain = compile_model(pristine, log=log, dump_dir=dump_dir, pipeline=eight_bit, runner=runner,
                              request=dataclasses.replace(request, target_cos=None, max_16bit_share=None),
                              on_first_candidate=on_first_candidate)
        plain.timings = {"mixed precision, nothing promoted": spent, **plain.timings}
        return plain
    with timed(result.timings, "evaluation"):
        if eval_data is held and judged_metrics is not None:  # the judge ran these very samples
            result.metrics = judged_metrics
        elif eval_data is not None:
            result.metrics = evaluate(original, result.module, eval_data)
    result.held_back = len(held) if held is not None else 0
    return result


def _calibration_samples(module: Module, request: CompileRequest, pipeline: Pipeline) -> tuple:
    """(calibration samples, held-back samples or None, the judge that runs or None). Every 4th sample is held
    back for ``judge`` sim/htp, for ``judge`` auto when it applies (``_auto_judges``), and with ``hold_back``
    when there are at least MIN_HELD_BACK_SAMPLES (else all calibrate; the check says so)."""
    from compiler.data import split_indices
    from compiler.judge import HELD_BACK_SHARE, JUDGES, MIN_HELD_BACK_SAMPLES
    if request.judge is not None and request.judge not in JUDGES:
        raise QccError(f"--judge: '{request.judge}' is not one of {', '.join(JUDGES)}")
    chosen = request.judge if request.judge in ("sim", "htp") else None
    if request.calib_data is None:
        if request.calib_count is not None:
            raise QccError("--calib-count needs --calib-data")
        if chosen is not None:
            raise QccError("--judge needs --calib-data: it judges on calibration samples held back")
        return None, None, None
    data = _dataset(request.calib_data, module, request, request.calib_count)
    if not hasattr(data, "__len__"):
        data = list(data)
    if chosen is not None and request.dump_after:
        raise QccError("--dump-after dumps one pipeline's passes; --judge runs several: give one of them")
    if chosen is None and request.judge == "auto" and _auto_judges(request, pipeline, len(data)):
        chosen = "auto"
    if not (chosen or request.hold_back) or len(data) < MIN_HELD_BACK_SAMPLES:
        if chosen is not None:
            raise QccError(f"--judge needs at least {MIN_HELD_BACK_SAMPLES} calibration samples to hold some back "
                           f"from calibration; got {len(data)}")
        return data, None, None
    keep, held = split_indices(len(data), HELD_BACK_SHARE)
    if isinstance(data, Dataset):
        return data.subset([data.files[i] for i in keep]), data.subset([data.files[i] for i in held]), chosen
    return [data[i] for i in keep], [data[i] for i in held], chosen


AUTO_JUDGE_SAMPLES = 8  # --judge auto holds back a quarter of the calibration samples from this many on


def _auto_judges(request: CompileRequest, pipeline: Pipeline, samples: int) -> bool:
    """``--judge auto`` judges the target's own 8-bit pipeline (no --passes, --calib-method, --target-cos or
    --dump-after, which fix what it would choose or need one pipeline) with at least AUTO_JUDGE_SAMPLES samples."""
    from compiler import judge
    return (request.passes is None and request.calib_method is None and request.target_cos is None
            and not request.dump_after and pipeline.config.act_bits == 8 and samples >= AUTO_JUDGE_SAMPLES
            and len(judge.pair(pipeline)) > 1)


@contextlib.contextmanager
def timed(timings: dict, stage: str):
    """Add the block's wall-clock seconds to ``timings[stage]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start


def compile_file(model_path: Path, output: Path, request: CompileRequest, *, force: bool = False,
                 started: float | None = None) -> CompileResult:
    """``qcc compile``: every check that can run before the first pass runs there (pipeline, output paths,
    every sample's names, shapes and dtypes); the outputs are staged and committed together at the end, so
    a failure anywhere leaves nothing of the run behind. ``started``: when the process started (perf_counter),
    so the profile shows the start-up (imports, argument parsing) too."""
    from compiler.encoding import has_qdq
    from compiler.ir import load
    from compiler.cluster import open_runner
    from compiler.judge import judge_lines
    start_up = time.perf_counter() - started if started is not None else None
    pipeline = request.pipeline()
    with plan_outputs(model_path, output, pipeline, request, force) as outputs:
        outputs.check()
        loading = {}
        with timed(loading, "load"):
            module = load(model_path, request.input_shapes)
        if "encodings" not in outputs.paths and has_qdq(module.graph):  # quantized before qcc saw it
            plan_quantized_outputs(outputs)
            outputs.check()
        dump_dir = outputs.folder("dumps") if request.dump_after else None
        runner = open_runner(request.workers, request.ray_address)
        prepared = []
        try:
            result = compile_model(module, request=request, pipeline=pipeline, dump_dir=dump_dir, runner=runner,
                                   on_first_candidate=_htp_session_in_advance(request, pipeline, runner, prepared))
            result.timings = {**({"start-up": start_up} if start_up is not None else {}), **loading, **result.timings}
            check_arch(result)
            # Exported once (by the judge, when it ran): the HTP check runs the very model (and FP32 reference) the
            # files then hold.
            exported = result.exported
            compiled = exported.compiled if exported else result.module.to_onnx()
            reference = exported.reference if exported else \
                result.reference.to_onnx() if result.reference is not None else None
            with timed(result.timings, "HTP check"):
                result.htp = htp_checks(result, request, compiled, reference)
        finally:
            runner.close()
            if prepared:  # a session the check did not take (the judge chose another candidate)
                from compiler.htp import PreparedSession
                PreparedSession.discard()
        lowered_from = result.context.lowered_from
        written = write_outputs(result, request, outputs, compiled,
                                lowered_from.to_onnx() if lowered_from is not None else reference)
    if not request.quiet:
        judged = judge_lines(result.judge) if result.judge else []
        for line in judged + summary_lines(result.metrics, data_label(request, result)) + result.htp.get("lines", []):
            print(line, file=sys.stderr)
        timings = ", ".join(f"{r.name} {r.seconds:.2f}s" for r in result.manager.records)
        print(f"compiled in {result.seconds:.2f}s ({timings})", file=sys.stderr)
        print(f"wrote {', '.join(path.name for path in written)}", file=sys.stderr)
    if request.profile:
        print(profile_table(result), file=sys.stderr, end="")
    return result


def _htp_session_in_advance(request: CompileRequest, pipeline: Pipeline, runner, prepared: list):
    """judge.choose's ``on_first`` when the HTP check will run in this process: the default candidate's HTP session
    is built on a background thread (htp.PreparedSession) while the other candidates compile and score, and
    the check takes it when the default is chosen, as it mostly is (det: the session's 0.5-0.9 s of one thread
    beside the judge's second candidate). Appends to ``prepared`` when it starts one."""
    from compiler.cluster import LocalRunner
    arch = pipeline.config.htp_arch
    # --judge htp builds HTP sessions of its own on this thread: no second build beside them.
    if not (request.htp_check and pipeline.quantizes and arch in HTP_ARCHS and isinstance(runner, LocalRunner)
            and request.judge != "htp"):
        return None

    def prepare(compiled) -> None:
        from compiler import htp
        try:
            htp.qnn_module()
        except QccError:
            return  # the check says it is skipped
        if not htp.dynamic_inputs(compiled):  # a dynamic model is pinned to the check's first sample first
            htp.PreparedSession.prepare(compiled, {"htp_arch": arch})
            prepared.append(arch)
    return prepare


def profile_table(result: CompileResult) -> str:
    """Where a compile's time went: start-up, load, each pass, evaluation, the HTP check, each write."""
    rows = [(stage, seconds) for stage, seconds in result.timings.items() if stage in ("start-up", "load")]
    rows += [(f"pass {r.name}", r.seconds) for r in result.manager.records]
    rows += [(stage, seconds) for stage, seconds in result.timings.items() if stage not in ("start-up", "load")]
    total = sum(seconds for _, seconds in rows)
    lines = [f"{'stage':<32}{'seconds':>9}{'share':>8}"]
    lines += [f"{stage:<32}{seconds:>9.3f}{seconds / total:>8.1%}" for stage, seconds in rows]
    return "\n".join(lines + [f"{'total':<32}{total:>9.3f}"]) + "\n"


def check_arch(result: CompileResult) -> None:
    """Refuse, before anything is written, a compiled model the config's HTP generation cannot run."""
    from compiler.qdq import arch_problems
    arch = HTP_ARCHS.get(result.context.config.htp_arch)
    problems = arch_problems(result.module, arch) if arch is not None else []
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise QccError(f"{problems[0]}{more}; compile with --weight-bits 8, or 16-bit activations (--act-bits 16) "
                       f"on a generation that takes 16-bit weights (--htp-arch 73 or later)")


def htp_checks(result: CompileResult, request: CompileRequest, compiled, reference) -> dict:
    """The compiled model on the QNN HTP backend of the config's generation (every one for --htp-arch all),
    on up to ``htp_samples`` held-out samples (else the last calibration samples): {"checks": [...]} with
    one htp.device_checks entry each and the summary lines, or {"skipped": why}."""
    from compiler import htp
    config = result.context.config
    if not (request.htp_check and result.manager.pipeline.quantizes and config.htp_arch in HTP_ARCHS
            and reference is not None):
        return {}
    try:
        htp.qnn_module()
    except QccError:
        return {"skipped": "onnxruntime-qnn is not installed", "lines": [
            f"qcc: note: HTP check skipped: {htp.INSTALL_HINT} (--no-htp-check silences this)"]}
    ctx = result.context
    held_out = ctx.eval_data is not None
    pool = ctx.eval_data if held_out else ctx.calib_data  # a Dataset or a list: only the samples used are read
    count = min(request.htp_samples, len(pool))
    samples = [pool[i] for i in (range(count) if held_out else range(len(pool) - count, len(pool)))]
    label = data_label(request, result) if held_out else \
        "calibration sample(s) (too few to hold some back: give --eval-data for held-out ones)"
    archs = sorted(HTP_ARCHS, key=int) if request.htp_arch == ALL_ARCHS else [config.htp_arch]
    # The judge ran the first held-back sample on CPU already: its outputs need not be computed again.
    known = [result.exported.first_outputs] if result.exported and held_out and ctx.eval_data is ctx.judge_data else []
    checks = htp.device_checks(compiled, reference, samples, archs, ctx.runner, request.htp_search, known)
    return {"checks": checks, "data": label, "lines": [line for check in checks for line in htp.check_lines(check, label)]}


def data_label(request: CompileRequest, result: CompileResult) -> str:
    """What the evaluation samples are, for the lines that report on them."""
    if request.eval_data is not None:
        return "held-out sample(s)"
    also = ", which also chose the pipeline (--judge)" if result.judge else ""
    return f"held-back calibration sample(s){also}"


def evaluate(reference: Module, candidate: Module, data) -> dict:
    """Per output: cosine mean/min over samples (near-zero FP32 outputs left out), SQNR dB over all."""
    from compiler.layer_analysis import output_metrics
    from compiler.runtime import make_session
    ref_session, got_session = make_session(reference), make_session(candidate)
    names = [o.name for o in ref_session.get_outputs()]
    return output_metrics((dict(zip(names, ref_session.run(names, sample))),
                           dict(zip(names, got_session.run(names, sample)))) for sample in data)


def summary_lines(metrics: dict, data: str = "held-out sample(s)") -> list[str]:
    lines = []
    for name, m in metrics.items():
        cos = "n/a" if m["cosine_mean"] is None else f"{m['cosine_mean']:.5f} (min {m['cosine_min']:.5f})"
        sqnr = "inf" if m["sqnr_db"] is None else f"{m['sqnr_db']:.2f} dB"
        note = f", {m['near_zero_samples']} near-zero sample(s) not in the cosine" if m["near_zero_samples"] else ""
        lines.append(f"output {name}: cosine {cos}, SQNR {sqnr} vs FP32 on {m['samples']} {data}{note}")
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


def plan_outputs(model_path: Path, output: Path, pipeline, request: CompileRequest, force: bool) -> OutputSet:
    """The files ``qcc compile`` may write: OUT, OUT.encodings and OUT.float.onnx (when the pipeline
    quantizes; ``plan_quantized_outputs`` adds them for a model quantized before qcc saw it),
    OUT.report.json and the --dump-after folder; the model and the data folders are inputs none of them
    may replace."""
    data_folders = [d for d in (request.calib_data, request.eval_data) if isinstance(d, (str, Path))]
    outputs = OutputSet(force=force, inputs=(model_path, *data_folders))
    outputs.add("compiled model", output)
    if any(p.name == "insert-qdq" for p in pipeline):
        plan_quantized_outputs(outputs)
    outputs.add("report", output.with_name(output.stem + ".report.json"))
    if request.dump_after:
        outputs.add("dumps", request.dump_dir or output.with_name(output.stem + ".dumps"), folder=True)
    return outputs


def plan_quantized_outputs(outputs: OutputSet) -> None:
    output = outputs.paths["compiled model"]
    outputs.add("encodings", output.with_suffix(".encodings"))
    outputs.add("float model", output.with_name(output.stem + ".float.onnx"))


def write_outputs(result: CompileResult, request: CompileRequest, outputs: OutputSet, compiled, float_model) -> list[Path]:
    """Stage OUT.onnx, OUT.encodings when quantized, OUT.float.onnx (the float model the encodings describe:
    the float rewrites applied and bias correction's and AdaRound's weights, as insert-qdq received it, its
    int32 biases at the values OUT.onnx stores (compiler.export.biases_as_stored), so
    that applying OUT.encodings to it gives OUT.onnx and ``qcc analyze OUT.float.onnx OUT.onnx`` compares
    like with like where CLE rescaled channels or fold-affine moved constants), OUT.report.json; commit them
    together. Each model is checked to load in onnxruntime first. ``compiled`` and ``float_model`` are
    ModelProtos (float_model None before any quantizing pass)."""
    from compiler.encoding import has_qdq
    from compiler.export import biases_as_stored, encodings_json
    from compiler.runtime import loadable_bytes
    module, times = result.module, result.timings
    with timed(times, "write compiled model"):
        names = {"model": outputs.write("compiled model", loadable_bytes(compiled, outputs.paths["compiled model"])).name}
    if has_qdq(module.graph):
        with timed(times, "write encodings"):
            names["encodings"] = outputs.write("encodings", encodings_json(module, request.encodings_format)).name
        if float_model is not None:
            with timed(times, "write float model"):
                biases_as_stored(float_model, module)
                data = loadable_bytes(float_model, outputs.paths["float model"])
                names["float_model"] = outputs.write("float model", data).name
    with timed(times, "write report and commit"):
        document = report(result.manager, result.context, result.seconds, result.metrics, names)
        document["htp"] = {key: value for key, value in result.htp.items() if key != "lines"}
        document["held_back_samples"] = result.held_back
        if result.judge:
            document["judge"] = result.judge
        document["timings"] = {stage: round(seconds, 3) for stage, seconds in times.items()}
        outputs.write("report", json.dumps(document, indent=1, default=_json) + "\n")
        return outputs.commit()


def _json(value):
    if isinstance(value, (np.generic,)):
        return value.item()
    return str(value)
