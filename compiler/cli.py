"""The `qcc` command line. User mistakes print one line and exit 2; no tracebacks."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from compiler.errors import PassFailure, QccError

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 70  # sysexits' EX_SOFTWARE: a bug in qcc
TRACEBACK_VARIABLE = "QCC_TRACEBACK"


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise QccError(f"{self.prog}: {message}")


def _input_shapes(values) -> dict:
    from compiler.ir import parse_input_shape
    shapes = {}
    for text in values or []:
        name, shape = parse_input_shape(text)
        if name in shapes and shapes[name] != shape:
            raise QccError(f"--input-shape: input '{name}' given twice, as {shapes[name]} and {shape}")
        shapes[name] = shape
    return shapes


def _add_compile(sub) -> None:
    from compiler import quantize
    from compiler.targets import TARGETS
    p = sub.add_parser("compile", help="run a target's pipeline (or --passes) on a model")
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True, help="output .onnx path")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--target", choices=sorted(TARGETS), default=None)
    group.add_argument("--passes", help="pipeline text, e.g. 'fold-constants,cleanup,fold-bn'")
    p.add_argument("--input-shape", action="append", metavar="NAME:D1,D2,...", help="fix a dynamic input shape (repeatable)")
    p.add_argument("--verify", action="store_true", help="check float-preserving passes against onnxruntime")
    p.add_argument("--dump-after", metavar="PASS|all", help="write the printer dump after PASS (or every pass)")
    p.add_argument("--dump-dir", default=None, help="folder for --dump-after (default: OUTPUT's stem + '.dumps')")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("-q", "--quiet", action="store_true")
    quantize.add_arguments(p)
    p.set_defaults(func=cmd_compile)


def build_context(args):
    from compiler.pass_manager import PassContext
    return PassContext(verbose=not args.quiet)


def cmd_compile(args) -> int:
    """Everything that can be checked is checked before the first pass (pipeline, output paths, every
    sample's names, shapes and dtypes); every output is staged and committed together at the end, so a
    failure anywhere leaves nothing of the run behind."""
    from compiler import quantize
    from compiler.encoding import has_qdq
    from compiler.ir import load
    from compiler.pass_manager import PassManager, parse_pipeline
    from compiler.targets import get_target
    model_path = Path(args.model)
    output = Path(args.output)
    target = get_target(args.target or "cpu")
    pipeline = parse_pipeline(quantize.pipeline_text(target, args))
    if args.dump_after and args.dump_after != "all" and args.dump_after not in {p.name for p in pipeline}:
        raise QccError(f"--dump-after: pass '{args.dump_after}' is not in the pipeline ({pipeline})")
    with quantize.plan_outputs(model_path, output, pipeline, args) as outputs:
        outputs.check()
        module = load(model_path, _input_shapes(args.input_shape))
        if "encodings" not in outputs.paths and has_qdq(module.graph):  # quantized before qcc saw it
            quantize.plan_quantized_outputs(outputs)
            outputs.check()
        ctx = build_context(args)
        original = quantize.prepare_context(module, ctx, args, pipeline)
        dump_dir = outputs.folder("dumps") if args.dump_after else None
        manager = PassManager(pipeline, verify=args.verify, dump_after=args.dump_after, dump_dir=dump_dir, quiet=args.quiet)
        start = time.perf_counter()
        manager.run(module, ctx)
        seconds = time.perf_counter() - start
        quantize.finish(original, module, manager, ctx, args, outputs, seconds)
    return 0


def _add_passes(sub) -> None:
    p = sub.add_parser("passes", help="list every pass with its options")
    p.set_defaults(func=cmd_passes)


def cmd_passes(args) -> int:
    import dataclasses
    from compiler.pass_manager import _format_value, _kebab, load_passes
    for name, cls in sorted(load_passes().items()):
        print(f"{name}  [{cls.kind.value}]  {cls.summary()}")
        for f in dataclasses.fields(cls.Options):
            allowed = f.metadata.get("choices")
            extra = f"  ({'|'.join(allowed)})" if allowed else ""
            print(f"    {_kebab(f.name)}={_format_value(f.default)}{extra}")
    return 0


def _add_print(sub) -> None:
    p = sub.add_parser("print", help="print a model in qcc's deterministic text form")
    p.add_argument("model")
    p.add_argument("--input-shape", action="append", metavar="NAME:D1,D2,...")
    p.set_defaults(func=cmd_print)


def cmd_print(args) -> int:
    from compiler.ir import load
    from compiler.printer import print_module
    sys.stdout.write(print_module(load(args.model, _input_shapes(args.input_shape))))
    return 0


def make_parser() -> argparse.ArgumentParser:
    """The parser of every command; called inside ``main``'s error handling, because building it imports
    onnx and onnxruntime (a second's work a user may interrupt)."""
    from compiler import analyze_cmd, compare_dump, htp
    commands = [_add_compile, _add_passes, _add_print, analyze_cmd.add_command, compare_dump.add_command, htp.add_command]
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
