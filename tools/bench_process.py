#!/usr/bin/env python3
"""Whole-process compile time: ``qcc compile --target htp`` (W8A8) against onnxruntime's quantize_static.

Both are timed as a user runs them, one process each, imports included, from the same float model (the
bench's: input shape pinned, canonicalized) and the same calibration samples written as .npy files:

- qcc: ``python -m compiler.cli compile FLOAT -o OUT --target htp --calib-data DIR`` (its four output files),
  once with the HTP check (the default when onnxruntime-qnn is installed) and once with ``--no-htp-check``;
- ORT: ``python tools/bench_process.py --ort FLOAT DIR OUT``: quant_pre_process, then quantize_static (QDQ,
  per-channel, uint8 activations, int8 weights, MinMax), as tools/bench.py runs it.

Usage (from the repository root):

    python tools/bench_process.py [--models cls,det,rec,orient] [--calib 16,64[,256]] [--repeat 1]

prints, per model and calibration count, each process's wall-clock seconds and qcc/ORT, then the same in CPU
seconds (user + system, all threads; less moved by the machine's other work than wall clock, but onnxruntime's
spinning worker threads count in it). ``--repeat N`` keeps the least of N runs of each. The assets cache must hold as many images
as the largest count (``python tools/fetch_assets.py --count 256`` renders 256, ``$QCC_ASSETS`` points at
another cache). tools/bench.py's accuracy table takes its qcc/ORT process column from here
(``process_seconds``). Measurements go to docs/measurements.md.
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tools import bench  # noqa: E402


def ort_quantize(float_path: str, calib_dir: str, out: str) -> None:
    """The ORT side, run in its own process: quant_pre_process, then quantize_static MinMax."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.files = iter(sorted(Path(calib_dir).glob("*.npy")))

        def get_next(self):
            path = next(self.files, None)
            return None if path is None else {"x": np.load(path)}

    prepared = str(Path(out).with_suffix(".pre.onnx"))
    quant_pre_process(float_path, prepared)
    quantize_static(prepared, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)


class Timing(NamedTuple):
    wall: float  # seconds
    cpu: float   # user + system seconds of the process and its threads: less moved by the machine's other work


def timed_run(command: list[str]) -> Timing:
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise SystemExit(f"bench_process: {' '.join(command[:4])} ... failed:\n{done.stderr[-2000:]}")
    return Timing(wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)


def write_samples(samples: list[dict], folder: Path) -> Path:
    """The samples as the .npy files both processes read (one input, ``x``)."""
    folder.mkdir(exist_ok=True)
    for i, sample in enumerate(samples):
        np.save(folder / f"{i:04d}.npy", sample["x"])
    return folder


RUNS = ("qcc", "qcc --no-htp-check", "ort")


def process_seconds(float_path: Path, calib_dir: Path, work: Path, repeat: int = 1, runs=RUNS) -> dict:
    """{run: Timing} for each of ``runs`` (of RUNS): the least wall and CPU seconds of ``repeat`` whole processes."""
    stem = work / float_path.name.split(".")[0]
    qcc = [sys.executable, "-m", "compiler.cli", "compile", str(float_path), "-o", f"{stem}.qcc.onnx",
           "--target", "htp", "--calib-data", str(calib_dir), "--force", "-q"]
    ort = [sys.executable, str(Path(__file__).resolve()), "--ort", str(float_path), str(calib_dir), f"{stem}.ort.onnx"]
    commands = {"qcc": qcc, "qcc --no-htp-check": qcc + ["--no-htp-check"], "ort": ort}
    # Round-robin over the runs, so that the machine's slower minutes (other work, throttling) fall on every
    # run alike rather than on all repeats of one.
    timings = {label: [] for label in runs}
    for _ in range(repeat):
        for label in runs:
            timings[label].append(timed_run(commands[label]))
    return {label: Timing(min(t.wall for t in tries), min(t.cpu for t in tries)) for label, tries in timings.items()}


def measure(name: str, count: int, repeat: int, assets: Path, work: Path) -> dict:
    float_path, calib, _ = bench.prepare(bench.MODELS[name], assets, work, count, 0)
    return process_seconds(float_path, write_samples(calib, work / f"{name}_calib_{count}"), work, repeat)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cls,det,rec,orient")
    parser.add_argument("--calib", default="16,64", help="calibration sample counts, comma-separated")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--ort", nargs=3, metavar=("FLOAT", "CALIB_DIR", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ort:
        ort_quantize(*args.ort)
        return 0
    from tools.fetch_assets import fetch
    counts = [int(c) for c in args.calib.split(",")]
    assets = fetch(count=max(64, max(counts)))
    print(f"{'model':<8}{'calib':>6}{'qcc s':>8}{'qcc, no HTP check s':>21}{'ORT s':>8}{'qcc/ORT':>9}{'no check/ORT':>14}"
          f"{'CPU s: qcc':>12}{'no check':>10}{'ORT':>7}{'qcc/ORT':>9}{'no check/ORT':>14}")
    with tempfile.TemporaryDirectory(prefix="qcc-bench-process-") as tmp:
        for name in args.models.split(","):
            for count in counts:
                t = measure(name, count, args.repeat, assets, Path(tmp))
                qcc, no_check, ort = t["qcc"], t["qcc --no-htp-check"], t["ort"]
                print(f"{name:<8}{count:>6}{qcc.wall:>8.2f}{no_check.wall:>21.2f}{ort.wall:>8.2f}"
                      f"{qcc.wall / ort.wall:>9.2f}{no_check.wall / ort.wall:>14.2f}{qcc.cpu:>12.2f}{no_check.cpu:>10.2f}"
                      f"{ort.cpu:>7.2f}{qcc.cpu / ort.cpu:>9.2f}{no_check.cpu / ort.cpu:>14.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
