#!/usr/bin/env python3
"""Scale-out on Ray: one ``qcc compile`` run in one process, on 1 Ray worker and on 2, timed as whole
processes, with the peak memory of the driver and of each Ray worker, and the outputs compared byte for byte.

    python tools/bench_scale.py [--model det] [--calib 256] [--check 64] [--workers 1,2] [--assets DIR]

The model is one of tools/bench.py's (input shape and image normalisation as there); calibration images are
its folder's first ``--calib`` files, the HTP check's the next ``--check`` (``--eval-data``, ``--htp-samples``).
Memory is sampled every 0.2 s from /proc: the ``qcc compile`` process and every Ray worker process
(``ray::`` in its command line; idle workers included). Ray's start-up is ``ray.init``'s time, as qcc prints it. Measurements go to docs/measurements.md.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tools import bench  # noqa: E402
from tools.fetch_assets import assets_dir  # noqa: E402

SAMPLE_SECONDS = 0.2


def rss_kb(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(r"VmRSS:\s+(\d+) kB", text)
    return int(match.group(1)) if match else 0


def ray_workers() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if command.startswith(b"ray::"):
                pids.append(int(entry.name))
    return pids


class MemorySampler(threading.Thread):
    """Peak RSS of ``pid`` and of every Ray worker process seen while it runs."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.driver, self.workers, self.running = pid, 0, {}, True

    def run(self) -> None:
        while self.running:
            self.driver = max(self.driver, rss_kb(self.pid))
            for worker in ray_workers():
                self.workers[worker] = max(self.workers.get(worker, 0), rss_kb(worker))
            time.sleep(SAMPLE_SECONDS)


def compile_once(model: bench.BenchModel, model_path: Path, calib: Path, check: Path, count: int, out: Path,
                 workers: int | None) -> dict:
    image = model.image
    command = [sys.executable, "-m", "compiler.cli", "compile", str(model_path), "-o", str(out), "--target", "htp",
               "--input-shape", "x:" + ",".join(map(str, model.shape)), "--calib-data", str(calib),
               "--eval-data", str(check), "--htp-samples", str(count), "--profile",
               "--image-mean", ",".join(map(str, image.mean)), "--image-std", ",".join(map(str, image.std))]
    if workers:
        command += ["--workers", str(workers)]
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    sampler = MemorySampler(process.pid)
    sampler.start()
    _, err = process.communicate()
    seconds = time.perf_counter() - start
    sampler.running = False
    sampler.join()
    if process.returncode:
        raise SystemExit(f"qcc compile failed ({process.returncode}): {err.strip().splitlines()[-1]}")
    stages = {m.group(1).strip(): float(m.group(2)) for m in re.finditer(r"^(\S.*?)\s+([\d.]+)\s+[\d.]+%$", err, re.M)}
    started = re.search(r"Ray started in ([\d.]+)s", err)
    stages["Ray start-up"] = float(started.group(1)) if started else 0.0
    return {"seconds": seconds, "driver_mb": sampler.driver / 1024,
            "worker_mb": sorted((kb / 1024 for kb in sampler.workers.values()), reverse=True),
            "stages": stages, "bytes": {suffix: out.with_suffix(suffix).read_bytes() for suffix in (".onnx", ".encodings")}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="det", choices=sorted(bench.MODELS))
    p.add_argument("--calib", type=int, default=256)
    p.add_argument("--check", type=int, default=64)
    p.add_argument("--workers", default="1,2", help="Ray worker counts to run besides the single process")
    p.add_argument("--assets", type=Path, default=None, help="the assets cache (default: QCC_ASSETS or the project's)")
    args = p.parse_args()
    args.assets = args.assets or assets_dir()
    model = bench.MODELS[args.model]
    files = sorted((args.assets / model.folder).glob("*.png"))
    if len(files) < args.calib + args.check:
        raise SystemExit(f"{args.assets / model.folder}: {len(files)} images, {args.calib + args.check} needed "
                         f"(python tools/fetch_assets.py --dest DIR --count {args.calib + args.check})")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, part in (("calib", files[:args.calib]), ("check", files[args.calib:args.calib + args.check])):
            (work / name).mkdir()
            for f in part:
                (work / name / f.name).symlink_to(f)
        runs = {}
        for workers in [None] + [int(w) for w in args.workers.split(",")]:
            label = "one process" if workers is None else f"{workers} Ray worker(s)"
            runs[label] = compile_once(model, args.assets / "models" / model.file, work / "calib", work / "check",
                                       args.check, work / f"out{workers or 0}.onnx", workers)
            print(f"[bench_scale] {label}: {runs[label]['seconds']:.1f} s", file=sys.stderr, flush=True)
    alone = runs["one process"]
    print(f"{args.model}: {args.calib} calibration images, HTP check on {args.check}")
    print(f"{'run':<20}{'seconds':>9}{'speed-up':>10}{'Ray start s':>12}{'calibrate s':>13}{'HTP check s':>13}{'driver MB':>11}"
          f"  worker MB (peak each)  same bytes")
    for label, run in runs.items():
        workers = ", ".join(f"{mb:.0f}" for mb in run["worker_mb"]) or "-"
        print(f"{label:<20}{run['seconds']:>9.1f}{alone['seconds'] / run['seconds']:>10.2f}"
              f"{run['stages']['Ray start-up']:>12.1f}{run['stages'].get('pass calibrate', 0):>13.1f}{run['stages'].get('HTP check', 0):>13.1f}"
              f"{run['driver_mb']:>11.0f}  {workers:<22} {run['bytes'] == alone['bytes']}")


if __name__ == "__main__":
    main()
