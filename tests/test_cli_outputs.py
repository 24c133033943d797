"""qcc compile's outputs: checked before any work, written all together or not at all, never over an input."""
import errno
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
import pytest

from compiler import outputs as outputs_module
from compiler.cli import main
from tests.conftest import CONV_MODEL

def compile_htp(work, output, *extra):
    return main(["compile", str(work / "m.onnx"), "-o", str(output), "--target", "htp",
                 "--calib-data", str(work / "data"), "-q", *map(str, extra)])


def one_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("qcc: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def listing(folder):
    return sorted(os.listdir(folder))


def test_quantized_compile_writes_four_files(work, capsys):
    assert compile_htp(work, work / "run" / "m.onnx") == 0
    assert listing(work / "run") == ["m.encodings", "m.float.onnx", "m.onnx", "m.report.json"]


@pytest.mark.parametrize("sidecar, role", [("m.encodings", "encodings"), ("m.float.onnx", "float model"),
                                           ("m.report.json", "report")])
def test_input_named_like_a_sidecar_is_not_overwritten(work, capsys, sidecar, role):
    model = work / "run" / sidecar
    model.write_bytes((work / "m.onnx").read_bytes())
    before = model.read_bytes()
    code = main(["compile", str(model), "-o", str(work / "run" / "m.onnx"), "--target", "htp",
                 "--calib-data", str(work / "data"), "-q"])
    assert code == 2 and f"refusing to overwrite the input {sidecar} with the {role}" in one_error(capsys)
    assert model.read_bytes() == before
    assert listing(work / "run") == [sidecar]


def test_existing_sidecar_needs_force(work, capsys):
    report = work / "run" / "m.report.json"
    report.write_text("keep")
    assert compile_htp(work, work / "run" / "m.onnx") == 2
    assert "m.report.json: already exists; pass --force" in one_error(capsys)
    assert listing(work / "run") == ["m.report.json"] and report.read_text() == "keep"
    assert compile_htp(work, work / "run" / "m.onnx", "--force") == 0
    assert report.read_text() != "keep"


def test_output_named_like_its_own_sidecar_is_refused(work, capsys):
    assert compile_htp(work, work / "run" / "m.encodings") == 2
    assert "would be written to the same file" in one_error(capsys)
    assert listing(work / "run") == []


def test_output_that_is_a_folder_is_refused_even_with_force(work, capsys):
    (work / "run" / "out.onnx").mkdir()
    assert compile_htp(work, work / "run" / "out.onnx", "--force") == 2
    assert "is a folder" in one_error(capsys)


def test_bad_eval_sample_is_reported_before_any_pass_and_nothing_is_written(work, capsys):
    bad = work / "eval"
    bad.mkdir()
    np.save(bad / "a.npy", np.zeros((1, 3, 8, 8), np.float32))
    np.save(bad / "b.npy", np.zeros((1, 3, 9, 9), np.float32))
    assert compile_htp(work, work / "run" / "m.onnx", "--eval-data", bad) == 2
    err = capsys.readouterr().err
    assert "b.npy: input 'x' has shape [1, 3, 9, 9]" in err
    assert "[1/" not in err.replace("-q", ""), "a pass ran before the samples were checked"
    assert listing(work / "run") == []


def test_failure_inside_a_pass_leaves_nothing(work, capsys, monkeypatch):
    from compiler.errors import QccError
    from passes.insert_qdq import InsertQdq

    def fail(self, module, ctx):
        raise QccError("insert-qdq failed on purpose")
    monkeypatch.setattr(InsertQdq, "run", fail)
    dumps = work / "run" / "dumps"
    assert compile_htp(work, work / "run" / "m.onnx", "--dump-after", "all", "--dump-dir", dumps) == 2
    assert "failed on purpose" in one_error(capsys)
    assert listing(work / "run") == []


def test_a_failing_rename_restores_every_output(work, capsys, monkeypatch):
    out = work / "run" / "m.onnx"
    assert compile_htp(work, out) == 0
    before = {name: (work / "run" / name).read_bytes() for name in listing(work / "run")}
    replace, calls = os.replace, []

    def disk_full_on_third(src, dst):
        calls.append(dst)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        replace(src, dst)
    monkeypatch.setattr(outputs_module.os, "replace", disk_full_on_third)
    assert compile_htp(work, out, "--force", "--calib-count", "2") == 2
    assert "No space left on device" in one_error(capsys)
    assert {name: (work / "run" / name).read_bytes() for name in listing(work / "run")} == before


def test_unwritable_folder_is_refused_before_any_work(work, capsys, monkeypatch):
    monkeypatch.setattr(outputs_module.os, "access", lambda path, mode: False)
    assert compile_htp(work, work / "run" / "m.onnx") == 2
    assert "is not writable" in one_error(capsys)


def test_unwritable_dump_folder_is_refused_before_any_work(work, capsys, monkeypatch):
    locked = work / "locked"
    locked.mkdir()
    access = os.access
    monkeypatch.setattr(outputs_module.os, "access", lambda path, mode: Path(path) != locked and access(path, mode))
    assert compile_htp(work, work / "run" / "m.onnx", "--dump-after", "all", "--dump-dir", locked / "dumps") == 2
    assert "locked' is not writable" in one_error(capsys)
    assert listing(work / "run") == [] and listing(locked) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_is_refused(work, capsys):
    os.chmod(work / "run", 0o555)
    try:
        assert compile_htp(work, work / "run" / "m.onnx") == 2
        assert "is not writable" in one_error(capsys)
    finally:
        os.chmod(work / "run", 0o755)


def test_modes_follow_the_umask_and_force_keeps_a_files_mode(work, capsys):
    out = work / "run" / "m.onnx"
    old = os.umask(0o027)
    try:
        assert compile_htp(work, out) == 0
        assert {stat.S_IMODE((work / "run" / n).stat().st_mode) for n in listing(work / "run")} == {0o640}
        os.chmod(out, 0o604)
        assert compile_htp(work, out, "--force") == 0
        assert stat.S_IMODE(out.stat().st_mode) == 0o604
        assert stat.S_IMODE((work / "run" / "m.encodings").stat().st_mode) == 0o640
    finally:
        os.umask(old)


def test_a_model_onnxruntime_cannot_load_is_not_written(work, capsys, monkeypatch):
    import onnx_graphsurgeon as gs
    from passes.cleanup import Cleanup
    original = Cleanup.run

    def int_weights(self, module, ctx):
        result = original(self, module, ctx)
        for tensor in module.graph.tensors().values():
            if isinstance(tensor, gs.Constant) and tensor.name == "w":
                tensor.values = tensor.values.astype(np.int32)
        return result
    monkeypatch.setattr(Cleanup, "run", int_weights)
    out = work / "run" / "m.onnx"
    assert main(["compile", str(work / "m.onnx"), "-o", str(out), "--target", "cpu", "-q"]) == 2
    assert "not written: the compiled model does not load in onnxruntime" in one_error(capsys)
    assert listing(work / "run") == []


@pytest.mark.parametrize("args, message", [
    (["--passes", ""], "no passes given"),
    (["--passes", "upgrade-opset{version=5}"], "option 'version' must be an opset qcc supports (7..23), got 5"),
    (["--passes", "calibrate,insert-qdq,insert-qdq"], "pass 'insert-qdq' appears more than once"),
    (["--passes", "calibrate,calibrate,insert-qdq"], "pass 'calibrate' appears more than once"),
    (["--input-shape", "x:1,3,8,8", "--input-shape", "x:2,3,8,8"], "input 'x' given twice"),
])
def test_contradictions_and_no_ops_are_refused(work, capsys, args, message):
    code = main(["compile", str(work / "m.onnx"), "-o", str(work / "run" / "m.onnx"),
                 "--calib-data", str(work / "data"), *args])
    assert code == 2 and message in one_error(capsys)
    assert listing(work / "run") == []


def test_repeating_an_input_shape_is_not_a_contradiction(work, capsys):
    code = main(["compile", str(work / "m.onnx"), "-o", str(work / "run" / "m.onnx"), "-q",
                 "--input-shape", "x:1,3,8,8", "--input-shape", "x:1,3,8,8"])
    assert code == 0
    ort.InferenceSession(str(work / "run" / "m.onnx"))


def test_importing_the_cli_loads_no_heavy_module():
    """Ctrl-C while onnx/onnxruntime import must land inside main's handler (exit 130, no traceback): the
    command line module itself imports neither."""
    probe = "import sys, compiler.cli; print(sorted(m for m in ('onnx', 'onnxruntime', 'numpy') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_interrupt_during_parser_construction_exits_130(monkeypatch, capsys):
    from compiler import cli

    def interrupted():
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "make_parser", interrupted)
    assert cli.main(["passes"]) == 130
    assert capsys.readouterr().err.strip() == "qcc: interrupted"


def test_analyze_of_two_different_networks_is_one_line(work, tmp_path, capsys):
    other = tmp_path / "other.onnx"
    onnx.save(onnx.parser.parse_model(CONV_MODEL.replace("Conv(x, w, b)", "Conv<strides=[2,2]>(x, w, b)")
                                      .replace("float[1,4,8,8] y", "float[1,4,4,4] y")), other)
    assert main(["compile", str(other), "-o", str(work / "run" / "o.onnx"), "--target", "htp",
                 "--calib-data", str(work / "data"), "-q"]) == 0
    code = main(["analyze", str(work / "m.onnx"), str(work / "run" / "o.onnx"), "--data", str(work / "data")])
    assert code == 2 and "are they the same network?" in one_error(capsys)


def test_a_bug_inside_a_pass_is_one_line_naming_the_pass_and_what_ran_before(work, capsys, monkeypatch):
    from passes.cle import CrossLayerEqualization as Cle

    def crash(self, module, ctx):
        raise ValueError("cannot reshape array of size 0")
    monkeypatch.setattr(Cle, "run", crash)
    assert compile_htp(work, work / "run" / "m.onnx") == 70
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [line] = [line for line in err.splitlines() if line.startswith("qcc: internal error:")]
    assert "pass 'cle' failed (ValueError: cannot reshape array of size 0)" in line
    before = line.split("passes before it: ")[1]
    assert before.startswith("fold-constants") and "replace-se" in before and "calibrate" not in before
    assert listing(work / "run") == []
    monkeypatch.setenv("QCC_TRACEBACK", "1")
    assert compile_htp(work, work / "run" / "m.onnx") == 70
    assert "Traceback" in capsys.readouterr().err
