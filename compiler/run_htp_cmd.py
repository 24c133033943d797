"""``qcc run-htp``: a QDQ model on the QNN HTP backend (onnxruntime-qnn, CPU fallback off) against the CPU
simulation, per output (compiler.htp does the work)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import onnx

from compiler.arguments import add_image_arguments, add_input_shape, image_options, input_shapes
from compiler.htp import compare_with_cpu, qnn_module, render
from compiler.ir import QccError, fix_input_shapes, load


def add_command(sub) -> None:
    p = sub.add_parser("run-htp", help="run a QDQ model on the QNN HTP backend (onnxruntime-qnn) and compare with CPU")
    p.add_argument("model", metavar="MODEL.onnx")
    p.add_argument("--data", required=True, metavar="DIR", help="folder of samples (.npy, .npz or images)")
    p.add_argument("--count", type=int, default=3, help="samples to run (default 3; HTP takes ~1 s per small image)")
    add_input_shape(p)
    add_image_arguments(p)
    p.add_argument("--htp-arch", metavar="N", help="HTP architecture to simulate, e.g. 73 (default: the backend's, v68; "
                   "v73 and later compute 16-bit convolutions exactly, v68 to ~20 steps)")
    p.add_argument("--json", metavar="OUT.json", help="write the comparison as JSON")
    p.set_defaults(func=cmd_run_htp)


def cmd_run_htp(args) -> int:
    from compiler.data import Dataset, specs_of
    from compiler.outputs import write_file
    qnn_module()
    if args.htp_arch is not None and not args.htp_arch.isdigit():
        raise QccError(f"--htp-arch '{args.htp_arch}': expected a number such as 68, 73, 75 or 79")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        raise QccError(f"{args.json}: output folder '{Path(args.json).parent}' does not exist")
    shapes = input_shapes(args.input_shape)
    module = load(args.model, shapes)
    samples = list(Dataset(args.data, specs_of(module), count=args.count, image=image_options(args)))
    model = onnx.load(args.model)
    # QNN compiles for static shapes: pin every input to the samples' shapes.
    model = fix_input_shapes(model, {name: list(value.shape) for name, value in samples[0].items()}, args.model)
    rows, seconds = compare_with_cpu(model, samples, {"htp_arch": args.htp_arch} if args.htp_arch else None)
    sys.stdout.write(render(rows, len(samples), seconds))
    if args.json:
        write_file(Path(args.json), json.dumps({"samples": len(samples), "htp_seconds_per_sample": seconds,
                                                 "outputs": [r.to_dict() for r in rows]}, indent=1) + "\n")
    return 0
