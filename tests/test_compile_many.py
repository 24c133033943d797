"""qcc compile-many: a manifest of compiles, each as qcc compile would run it, one failure not stopping the rest."""
import json

import pytest

from compiler.cli import main


def manifest(work, entries) -> str:
    path = work / "manifest.json"
    path.write_text(json.dumps(entries))
    return str(path)


def entry(work, output, **options):
    return {"model": str(work / "m.onnx"), "output": str(work / "run" / output), "target": "htp",
            "calib_data": str(work / "data"), "quiet": True, "no_htp_check": True, **options}


def test_each_entry_compiles_as_qcc_compile_would_and_a_failure_stops_nothing(work, capsys):
    entries = [entry(work, "a.onnx"), {**entry(work, "b.onnx"), "model": str(work / "absent.onnx")},
               entry(work, "c.onnx", act_bits=16, input_shape=["x:1,3,8,8"])]
    assert main(["compile-many", manifest(work, entries)]) == 1
    out = capsys.readouterr().out
    assert "absent.onnx: no such file" in out and out.count(" ok") == 2
    names = sorted(p.name for p in (work / "run").iterdir())
    assert names == sorted(f"{stem}.{suffix}" for stem in "ac" for suffix in ("onnx", "encodings", "float.onnx", "report.json"))
    assert main(["compile", str(work / "m.onnx"), "-o", str(work / "single.onnx"), "--target", "htp", "-q",
                 "--no-htp-check", "--calib-data", str(work / "data"), "--act-bits", "16"]) == 0
    assert (work / "single.onnx").read_bytes() == (work / "run" / "c.onnx").read_bytes()


def test_a_mistake_in_any_entry_is_refused_before_anything_compiles(work, capsys):
    for bad, message in (({"act_bits": 12}, "entry 1: argument --act-bits: invalid choice"),
                         ({"colour": "red"}, "entry 1: unknown key 'colour'; valid keys: model, act_bits"),
                         ({"verify": "yes"}, "entry 1: 'verify' is a flag: true or false, got 'yes'")):
        path = manifest(work, [entry(work, "a.onnx"), entry(work, "b.onnx", **bad)])
        assert main(["compile-many", path]) == 2
        assert message in capsys.readouterr().err
        assert list((work / "run").iterdir()) == []


def test_two_entries_writing_one_file_are_refused(work, capsys):
    assert main(["compile-many", manifest(work, [entry(work, "a.onnx"), entry(work, "a.onnx")])]) == 2
    assert "entries 0 and 1 both write" in capsys.readouterr().err


def test_two_ray_workers_write_the_bytes_one_process_writes(work, capsys):
    pytest.importorskip("ray")
    entries = [entry(work, "a.onnx"), entry(work, "b.onnx", act_bits=16), entry(work, "c.onnx", target="cpu")]
    assert main(["compile-many", manifest(work, entries)]) == 0
    alone = {p.name: p.read_bytes() for p in (work / "run").iterdir() if not p.name.endswith(".report.json")}
    for p in (work / "run").iterdir():
        p.unlink()
    assert main(["compile-many", manifest(work, entries), "--workers", "2"]) == 0
    assert "[3/3] entry" in capsys.readouterr().err
    on_ray = {p.name: p.read_bytes() for p in (work / "run").iterdir() if not p.name.endswith(".report.json")}
    assert on_ray == alone and len(alone) == 2 * 3 + 1  # two quantized (model, encodings, float model) and a float


def test_workers_without_ray_is_one_line(work, capsys, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray":
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_ray)
    assert main(["compile-many", manifest(work, [entry(work, "a.onnx")]), "--workers", "2"]) == 2
    assert "pip install 'qcc[ray]'" in capsys.readouterr().err
