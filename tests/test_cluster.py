"""Scale-out on Ray (compiler.cluster): calibration shards and the HTP check's runs as Ray tasks write the bytes
one process writes; a worker that dies has its task run again; Ctrl-C cancels the tasks."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from compiler import calibration
from compiler.cli import main

ray = pytest.importorskip("ray")
from compiler.cluster import RayRunner  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def write_samples(folder: Path, count: int) -> None:
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(count):
        np.save(folder / f"s{i:03d}.npy", (rng.normal(size=(1, 3, 8, 8)) * (1 + i % 5)).astype(np.float32))


def compile_args(work, output: str, *extra) -> list[str]:
    return ["compile", str(work / "m.onnx"), "-o", str(work / output), "--target", "htp", "-q",
            "--calib-data", str(work / "many"), "--htp-arch", "68", *extra]


def written(work, stem: str) -> dict:
    return {suffix: (work / f"{stem}{suffix}").read_bytes() for suffix in (".onnx", ".encodings", ".float.onnx")}


def htp_numbers(work, stem: str) -> list:
    checks = json.loads((work / f"{stem}.report.json").read_text())["htp"].get("checks", [])
    return [{key: value for key, value in check.items() if key != "seconds_per_sample"} for check in checks]


def test_two_workers_write_what_one_process_writes(work, monkeypatch):
    monkeypatch.setattr(calibration, "SHARD_SAMPLES", 8)  # 40 samples, 30 calibrate: 4 shards
    write_samples(work / "many", 40)
    assert main(compile_args(work, "alone.onnx", "--htp-samples", "4")) == 0
    assert main(compile_args(work, "ray.onnx", "--htp-samples", "4", "--workers", "2")) == 0
    assert written(work, "alone") == written(work, "ray")
    assert htp_numbers(work, "alone") == htp_numbers(work, "ray")
    report = json.loads((work / "ray.report.json").read_text())
    assert report["calibration_samples"] == 30


def test_mixed_precision_screening_on_two_workers_chooses_what_one_process_chooses(work):
    write_samples(work / "many", 12)
    mixed = ("--no-htp-check", "--target-cos", "0.99999", "--max-16bit-share", "1")
    assert main(compile_args(work, "alone.onnx", *mixed)) == 0
    assert main(compile_args(work, "ray.onnx", *mixed, "--workers", "2")) == 0
    assert written(work, "alone") == written(work, "ray")
    stats = next(p["stats"] for p in json.loads((work / "ray.report.json").read_text())["passes"]
                 if p["name"] == "promote-16bit")
    assert stats["cos-before"] < 0.99999 and "share-16bit" in stats


def test_a_task_whose_worker_dies_runs_again_with_the_same_result(work, tmp_path, monkeypatch):
    monkeypatch.setattr(calibration, "SHARD_SAMPLES", 8)
    write_samples(work / "many", 40)
    assert main(compile_args(work, "alone.onnx", "--no-htp-check")) == 0
    marker = tmp_path / "a worker died"

    class DyingRunner(RayRunner):
        """The first task to start kills its worker process (as the OOM killer or a lost node would)."""

        def map(self, function, items, shared=None, label=None, each=None):
            def dies_once(shared, item, function=function):
                if not os.path.exists(marker):
                    open(marker, "w").close()
                    os._exit(1)
                return function(shared, item)
            return super().map(dies_once, items, shared, label, each)

    monkeypatch.setattr("compiler.cluster.RayRunner", DyingRunner)
    assert main(compile_args(work, "ray.onnx", "--no-htp-check", "--workers", "2")) == 0
    assert marker.exists()
    assert written(work, "alone") == written(work, "ray")


def test_without_ray_the_flags_say_how_to_install_it(work, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as if it were not installed
    assert main(["compile", str(work / "m.onnx"), "-o", str(work / "o.onnx"), "--target", "htp", "--calib-data",
                 str(work / "data"), "--workers", "2"]) == 2
    assert "pip install 'qcc[ray]'" in capsys.readouterr().err
    assert not (work / "o.onnx").exists()


CANCELLED = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from compiler.cluster import RayRunner
    marker = Path(sys.argv[1])
    def slow(shared, item):
        (marker / f"started{item}").touch()
        time.sleep(60)
        (marker / f"finished{item}").touch()
    runner = RayRunner(workers=2)
    try:
        runner.map(slow, [0, 1])
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    finally:
        runner.close()
""")


def test_ctrl_c_cancels_the_running_tasks(tmp_path):
    process = subprocess.Popen([sys.executable, "-c", CANCELLED, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob("started*")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert list(tmp_path.glob("started*")), "no task started"
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=45)
    assert "interrupted" in output
    time.sleep(1)
    assert not list(tmp_path.glob("finished*"))
