"""The `qcc` command line. User mistakes print one line and exit 2; no tracebacks."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import time

from compiler.errors import PassFailure, QccError

STARTED = time.perf_counter()  # as the command line module loads: what follows is qcc's own start-up

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 70  # sysexits' EX_SOFTWARE: a bug in qcc
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader closed the pipe
TRACEBACK_VARIABLE = "QCC_TRACEBACK"


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise QccError(f"{self.prog}: {message}")


def _add_quantization(parser) -> None:
    """The quantization flags of ``qcc compile``."""
    from compiler.arguments import add_image_arguments
    from compiler.calibration import METHODS
    from compiler.config import DEFAULT_HTP_ARCH
    from compiler.encoding import HTP_ARCHS
    from compiler.export import FORMATS
    group = parser.add_argument_group("quantization (targets htp, dsp, hta)")
    group.add_argument("--calib-data", metavar="DIR", help="folder of calibration samples (.npy, .npz or images)")
    group.add_argument("--calib-count", type=int, metavar="N", help="use at most N calibration samples")
    group.add_argument("--eval-data", metavar="DIR",
                       help="held-out samples: report each output's cosine and SQNR vs FP32, and run the HTP check on "
                            "them (without it, a quarter of --calib-data is held back from calibration for that)")
    add_image_arguments(group)
    group.add_argument("--act-bits", type=int, choices=(8, 16), help="activation bit-width (target default: 8)")
    group.add_argument("--weight-bits", type=int, choices=(4, 8, 16), help="weight bit-width (target default: 8)")
    group.add_argument("--calib-method", choices=METHODS + ("auto",), help="activation range method (target default: mse at 8-bit activations, minmax at 16)")
    group.add_argument("--target-cos", type=float, metavar="COS",
                       help="mixed precision: move the activations that cost the most accuracy to 16 bits until the "
                            "output cosine vs FP32 on calibration data reaches COS (promote-16bit; e.g. 0.999)")
    group.add_argument("--max-16bit-share", type=float, metavar="SHARE",
                       help="with --target-cos: at most this share of the activation bytes at 16 bits "
                            "(default 0.25; 1 is every activation at 16 bits)")
    group.add_argument("--htp-arch", choices=(*HTP_ARCHS, "all"),
                       help=f"the Hexagon NPU generation (target htp; default {DEFAULT_HTP_ARCH}: the oldest that takes "
                            "16-bit weights and computes 16-bit convolutions as the simulation does); 'all' compiles by "
                            "the oldest's rules and checks on every one")
    group.add_argument("--judge", choices=("auto", "off", "sim", "htp"), default="auto",
                       help="choose the calibration method and bias-correction mode by the compiled model's cosine vs "
                            "FP32 on the quarter of --calib-data held back from calibration. auto (default): the "
                            "8-bit default (mse, sequential) against percentile with the empirical correction, in "
                            "CPU simulation, on a target's W8A8 pipeline from 8 samples on (about one more compile); "
                            "sim: up to 9 candidates in simulation; htp: the same on the HTP backend of --htp-arch "
                            "(about 50x slower per sample); off: the default pipeline as is")
    group.add_argument("--no-htp-check", action="store_true",
                       help="do not run the compiled model on the QNN HTP backend (onnxruntime-qnn) at the end")
    group.add_argument("--htp-samples", type=int, default=1, metavar="N",
                       help="samples for the HTP check (default 1; about a second each for a small image)")
    group.add_argument("--htp-search", action="store_true",
                       help="where the HTP check finds HTP more than 0.002 of cosine further from FP32 than the "
                            "simulation, search layer by layer for the first tensors where the two part (about a "
                            "second per 30 tensors)")
    group.add_argument("--encodings-format", choices=FORMATS, default="1.0.0",
                       help="layout of OUT.encodings (docs/encodings.md): 1.0.0, AIMET 2's lists (default; "
                            "qnn-onnx-converter's --custom_io breaks with it, aimet #4046); 2.0.0, QuantizeLinear's "
                            "terms with the per-channel axis (the converter reads it with its beta Quantizer V2, "
                            "aimet #4090); 0.6.1, the legacy dicts (--custom_io works with them)")


def _add_compile(sub) -> None:
    p = sub.add_parser("compile", help="run a target's pipeline (or --passes) on a model")
    _compile_arguments(p)
    p.set_defaults(func=cmd_compile)


def _compile_arguments(p) -> None:
    from compiler.arguments import add_input_shape
    from compiler.targets import TARGETS
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True, help="output .onnx path")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--target", choices=sorted(TARGETS), default=None)
    group.add_argument("--passes", help="pipeline text, e.g. 'fold-constants,cleanup,fold-bn'")
    add_input_shape(p)
    p.add_argument("--verify", action="store_true", help="check float-preserving passes against onnxruntime")
    p.add_argument("--dump-after", metavar="PASS|all", help="write the printer dump after PASS (or every pass)")
    p.add_argument("--dump-dir", default=None, help="folder for --dump-after (default: OUTPUT's stem + '.dumps')")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("--profile", action="store_true",
                   help="print where the time went: start-up, load, each pass, evaluation, HTP check, each write")
    _add_quantization(p)
    _add_ray_arguments(p, "run calibration shards and the HTP check's runs as Ray tasks")


def _add_ray_arguments(p, what: str) -> None:
    group = p.add_argument_group(f"scale-out on Ray (pip install 'qcc[ray]'): {what}; the same bytes as without")
    group.add_argument("--workers", type=int, metavar="N", help="on a local Ray with N workers")
    group.add_argument("--ray-address", metavar="ADDR", help="on the Ray cluster at ADDR (ray start --head ...)")


def cmd_compile(args) -> int:
    from compiler.quantize import compile_file
    compile_file(Path(args.model), Path(args.output), _request(args), force=args.force, started=STARTED)
    return 0


def _request(args):
    from compiler.arguments import image_options, input_shapes
    from compiler.quantize import CompileRequest
    return CompileRequest(
        target=args.target or "cpu", passes=args.passes, act_bits=args.act_bits, weight_bits=args.weight_bits,
        calib_method=args.calib_method, target_cos=args.target_cos, max_16bit_share=args.max_16bit_share,
        calib_data=args.calib_data, calib_count=args.calib_count, eval_data=args.eval_data,
        image=image_options(args), input_shapes=input_shapes(args.input_shape), verify=args.verify,
        dump_after=args.dump_after, dump_dir=args.dump_dir, encodings_format=args.encodings_format, quiet=args.quiet,
        htp_arch=args.htp_arch, htp_check=not args.no_htp_check, htp_samples=args.htp_samples, htp_search=args.htp_search, profile=args.profile,
        judge=args.judge, hold_back=args.eval_data is None, workers=args.workers, ray_address=args.ray_address)


def _add_compile_many(sub) -> None:
    p = sub.add_parser("compile-many", help="compile every entry of a JSON manifest, one after the other")
    p.add_argument("manifest", metavar="MANIFEST.json",
                   help="a JSON list of objects whose keys are qcc compile's options in snake_case (model, output, "
                        "target, calib_data, input_shape as a list, act_bits, ...); true for a flag; paths as on "
                        "the command line (relative to the working directory)")
    _add_ray_arguments(p, "each entry a Ray task")
    p.set_defaults(func=cmd_compile_many)


EXIT_SOME_FAILED = 1


def cmd_compile_many(args) -> int:
    """Every entry is parsed as ``qcc compile`` would parse it before any compile runs (a mistake names the
    entry); then each compiles on its own, in this process or as a Ray task (--workers, --ray-address): one
    entry's failure is reported and the others go on. A summary table ends the run, in manifest order; exit 1
    when any entry failed. Each compile writes its outputs whole or not at all."""
    argvs, entries = _manifest_entries(Path(args.manifest))
    outputs = {}
    for index, entry in enumerate(entries):
        output = Path(entry.output).resolve()
        if output in outputs:
            raise QccError(f"{args.manifest}: entries {outputs[output]} and {index} both write {entry.output}")
        outputs[output] = index
    from compiler.cluster import open_runner
    runner = open_runner(args.workers, args.ray_address)
    finished = []

    def report(index: int, result: tuple) -> None:
        finished.append(index)
        print(f"[{len(finished)}/{len(argvs)}] entry {index} ({entries[index].model}): {result[0].splitlines()[0]}",
              file=sys.stderr)
    try:
        results = runner.map(compile_entry, argvs, label="compile-many", each=report)
    finally:
        runner.close()
    rows = [(index, entry.model, entry.output, status, seconds)
            for index, (entry, (status, seconds)) in enumerate(zip(entries, results))]
    width = max(len(str(r[1])) for r in rows)
    print(f"{'#':>3}  {'model':<{width}}  {'seconds':>8}  status")
    for index, model, _, status, seconds in rows:
        print(f"{index:>3}  {model:<{width}}  {seconds:>8.2f}  {status.splitlines()[0]}")
    return EXIT_SOME_FAILED if any(r[3] != "ok" for r in rows) else 0


def compile_entry(_, argv: list[str]) -> tuple[str, float]:
    """One manifest entry's compile from its ``qcc compile`` arguments: ("ok" or "failed: why", seconds). A Ray
    task runs this in a worker process (compiler.cluster; nothing shared: the first argument is unused);
    without Ray, the command's own process does."""
    import time as clock

    from compiler.quantize import compile_file
    start = clock.perf_counter()
    parser = _Parser(prog="qcc compile")
    _compile_arguments(parser)
    try:
        entry = parser.parse_args(argv)
        compile_file(Path(entry.model), Path(entry.output), _request(entry), force=entry.force)
        status = "ok"
    except QccError as exc:
        status = f"failed: {exc}"
    except Exception as exc:  # a bug in one entry's compile: reported, the others still run
        status = f"failed: internal error: {type(exc).__name__}: {exc}"
    return status, clock.perf_counter() - start


def _manifest_entries(path: Path) -> tuple[list, list]:
    """The manifest's entries as ``qcc compile`` arguments, and as parsed (checked before any work)."""
    import json
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise QccError(f"{path}: cannot read the manifest ({type(exc).__name__}: {exc})") from None
    if not isinstance(document, list) or not document or not all(isinstance(e, dict) for e in document):
        raise QccError(f"{path}: the manifest must be a non-empty JSON list of objects")
    argvs, entries = [], []
    for index, entry in enumerate(document):
        parser = _Parser(prog=f"{path}: entry {index}")
        _compile_arguments(parser)
        argvs.append(_argv(entry, parser, path, index))
        entries.append(parser.parse_args(argvs[-1]))
    return argvs, entries


RUN_WIDE_OPTIONS = {"workers", "ray_address"}  # where the whole batch runs, not one entry


def _argv(entry: dict, parser, path: Path, index: int) -> list[str]:
    """``qcc compile``'s command line for one manifest entry: model first, then each key as its option."""
    options = {action.dest: action for action in parser._actions if action.option_strings}
    if "model" not in entry:
        raise QccError(f"{path}: entry {index} has no 'model'")
    argv = [str(entry["model"])]
    for key, value in entry.items():
        if key == "model":
            continue
        if key in RUN_WIDE_OPTIONS:
            raise QccError(f"{path}: entry {index}: '{key}' is compile-many's own option (--{key.replace('_', '-')}), "
                           "not an entry's")
        if key not in options:
            raise QccError(f"{path}: entry {index}: unknown key '{key}'; valid keys: model, "
                           f"{', '.join(sorted(set(options) - RUN_WIDE_OPTIONS))}")
        flag = options[key].option_strings[-1]
        if options[key].nargs == 0:  # a flag
            if not isinstance(value, bool):
                raise QccError(f"{path}: entry {index}: '{key}' is a flag: true or false, got {value!r}")
            argv += [flag] if value else []
        else:
            argv += [part for item in (value if isinstance(value, list) else [value]) for part in (flag, str(item))]
    return argv


def _add_passes(sub) -> None:
    p = sub.add_parser("passes", help="list every pass with its options")
    p.set_defaults(func=cmd_passes)


def cmd_passes(args) -> int:
    """The quantization config (a pipeline's leading quant{...}), then every pass, each with its options."""
    from compiler.config import CONFIG_NAME, QuantConfig
    from compiler.pass_manager import load_passes
    print(f"{CONFIG_NAME}  [config]  The quantization config every pass reads; first in a pipeline: quant{{act-bits=16}},...")
    _print_options(QuantConfig)
    for name, cls in sorted(load_passes().items()):
        print(f"{name}  [{cls.kind.value}]  {cls.summary()}")
        _print_options(cls.Options)
    return 0


def _print_options(options_type) -> None:
    import dataclasses
    from compiler.pass_manager import _format_value, _kebab
    for f in dataclasses.fields(options_type):
        allowed = f.metadata.get("choices")
        extra = f"  ({'|'.join(allowed)})" if allowed else ""
        print(f"    {_kebab(f.name)}={_format_value(f.default)}{extra}")


def _add_print(sub) -> None:
    from compiler.arguments import add_input_shape
    p = sub.add_parser("print", help="print a model in qcc's deterministic text form")
    p.add_argument("model")
    add_input_shape(p)
    p.set_defaults(func=cmd_print)


def cmd_print(args) -> int:
    from compiler.arguments import input_shapes
    from compiler.ir import load
    from compiler.printer import print_module
    sys.stdout.write(print_module(load(args.model, input_shapes(args.input_shape), check_contents=False)))
    return 0


def make_parser() -> argparse.ArgumentParser:
    """The parser of every command; called inside ``main``'s error handling, because building it imports
    onnx and onnxruntime (a second's work a user may interrupt)."""
    from compiler import analyze_cmd, compare_dump, encodings_cmd, run_htp_cmd
    commands = [_add_compile, _add_compile_many, _add_passes, _add_print, analyze_cmd.add_command,
                compare_dump.add_command, run_htp_cmd.add_command, encodings_cmd.add_command]
    parser = _Parser(prog="qcc", description="ONNX quantization compiler for Qualcomm HTP-class NPUs")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in commands:
        add(sub)
    return parser


def main(argv=None) -> int:
    try:
        args = make_parser().parse_args(argv)
        return args.func(args)
    except QccError as exc:
        print(f"qcc: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("qcc: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (qcc passes | head): stop quietly, as SIGPIPE would
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except Exception as exc:  # a bug: one line by default, the traceback on request
        import os
        import traceback
        if os.environ.get(TRACEBACK_VARIABLE):
            traceback.print_exception(exc.cause if isinstance(exc, PassFailure) else exc)
        what = str(exc) if isinstance(exc, PassFailure) else f"{type(exc).__name__}: {exc}"
        print(f"qcc: internal error: {what} (a bug in qcc; {TRACEBACK_VARIABLE}=1 shows the traceback)",
              file=sys.stderr)
        return EXIT_INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
