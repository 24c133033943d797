"""The CLI as a new user meets it: one clear line and a non-zero exit for each mistake, no partial files."""
import os
import subprocess
import sys

import onnx
import onnx.parser
import pytest

from compiler.cli import main

MODEL_TEXT = """
<ir_version: 8, opset_import: ["" : 11]>
g (float[1,3,8,8] x) => (float[1,4,8,8] y) <float[4,3,1,1] w = {1,0,0, 0,1,0, 0,0,1, 1,1,1}> {
  c = Conv(x, w)
  i = Identity(c)
  y = Relu(i)
}
"""


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(onnx.parser.parse_model(MODEL_TEXT), path)
    return path


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    return code, err


def error_lines(err):
    return [line for line in err.splitlines() if line.startswith("qcc: error:")]


def test_compile_cpu_target_writes_model(model, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    code, err = run_cli(["compile", model, "-o", out, "--target", "cpu", "--verify"], capsys)
    assert code == 0, err
    compiled = onnx.load(out)
    assert [n.op_type for n in compiled.graph.node] == ["Conv", "Relu"]
    assert compiled.opset_import[0].version == 13
    meta = {p.key: p.value for p in compiled.metadata_props}
    assert meta["qcc.pipeline"].startswith("fold-constants{")


def test_print_is_deterministic(model, tmp_path):
    def dump():
        return subprocess.run([sys.executable, "-m", "compiler.cli", "print", str(model)],
                              capture_output=True, check=True).stdout
    first = dump()
    assert first == dump()
    assert b"%c = Conv(%x, @w)" in first


def test_passes_lists_every_pass(capsys):
    from compiler.pass_manager import load_passes
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    for name in load_passes():
        assert f"{name}  [" in out


def _bad_inputs(tmp_path, model):
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n")
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(model.read_bytes()[: len(model.read_bytes()) // 2])
    return {
        "missing file": (["compile", tmp_path / "absent.onnx", "-o", tmp_path / "o1.onnx"], "no such file"),
        "text file": (["compile", text, "-o", tmp_path / "o2.onnx"], "not"),
        "truncated": (["compile", truncated, "-o", tmp_path / "o3.onnx"], "truncated.onnx"),
        "unknown pass": (["compile", model, "-o", tmp_path / "o4.onnx", "--passes", "fold-bnn"], "unknown pass 'fold-bnn'"),
        "bad option value": (["compile", model, "-o", tmp_path / "o5.onnx", "--passes", "upgrade-opset{version=x}"], "expects int"),
        "output equals input": (["compile", model, "-o", model], "refusing to overwrite the input model"),
        "bad input shape": (["compile", model, "-o", tmp_path / "o6.onnx", "--input-shape", "y:1,3"], "no input 'y'"),
        "unknown target": (["compile", model, "-o", tmp_path / "o7.onnx", "--target", "npu"], "invalid choice"),
        "missing output folder": (["compile", model, "-o", tmp_path / "nowhere" / "o8.onnx"], "does not exist"),
    }


@pytest.mark.parametrize("case", ["missing file", "text file", "truncated", "unknown pass", "bad option value",
                                  "output equals input", "bad input shape", "unknown target", "missing output folder"])
def test_user_mistakes_give_one_line_and_no_file(case, model, tmp_path, capsys):
    before = sorted(os.listdir(tmp_path))
    model_bytes = model.read_bytes()
    args, message = _bad_inputs(tmp_path, model)[case]
    before = sorted(os.listdir(tmp_path))
    code, err = run_cli(args, capsys)
    assert code == 2
    lines = error_lines(err)
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == before, "a partial or temporary file was left behind"
    assert model.read_bytes() == model_bytes


def test_existing_output_needs_force(model, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"keep me")
    code, err = run_cli(["compile", model, "-o", out], capsys)
    assert code == 2 and "already exists" in err
    assert out.read_bytes() == b"keep me"
    code, err = run_cli(["compile", model, "-o", out, "--force"], capsys)
    assert code == 0 and onnx.load(out).graph.node


def test_dynamic_input_without_shape_is_explained_under_verify(tmp_path, capsys):
    dynamic = tmp_path / "dyn.onnx"
    onnx.save(onnx.parser.parse_model(MODEL_TEXT.replace("float[1,3,8,8] x", "float[N,3,H,W] x")
                                      .replace("float[1,4,8,8] y", "float[N,4,H,W] y")), dynamic)
    code, err = run_cli(["compile", dynamic, "-o", tmp_path / "o.onnx", "--verify"], capsys)
    assert code == 2 and "--input-shape x:" in err
    code, err = run_cli(["compile", dynamic, "-o", tmp_path / "o.onnx", "--verify", "--input-shape", "x:1,3,8,8"], capsys)
    assert code == 0, err


def test_control_flow_is_declined(tmp_path, capsys):
    path = tmp_path / "if.onnx"
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (bool c, float[2] x) => (float[2] y) {
      y = If(c) <then_branch = t () => (float[2] a) { a = Identity(x) },
                 else_branch = e () => (float[2] b) { b = Neg(x) }>
    }
    """
    onnx.save(onnx.parser.parse_model(text), path)
    code, err = run_cli(["compile", path, "-o", tmp_path / "o.onnx"], capsys)
    assert code == 2 and "control flow is not supported" in err


def test_real_models_canonicalize_with_verify(assets, tmp_path, capsys):
    for name, shape in (("ppocr_cls", "x:1,3,48,192"), ("ppocr_det", "x:1,3,320,320")):
        out = tmp_path / f"{name}.onnx"
        code, err = run_cli(["compile", assets / "models" / f"{name}.onnx", "--input-shape", shape,
                             "--passes", "fold-constants,cleanup,upgrade-opset", "--verify", "-o", out], capsys)
        assert code == 0, err
        ops = {n.op_type for n in onnx.load(out).graph.node}
        assert "Constant" not in ops


def test_passes_lists_the_quantization_config_first(capsys):
    assert main(["passes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("quant  [config]")
    assert lines[1:6] == ["    act-bits=8", "    weight-bits=8", "    bias-bits=32", "    per-channel=true",
                          "    htp-arch=73  (68|69|73|75|79|81|none)"]


def test_a_closed_pipe_stops_quietly():
    done = subprocess.run(f"{sys.executable} -m compiler.cli passes | head -1", shell=True, capture_output=True,
                          text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.stdout.startswith("quant  [config]") and done.stderr == ""
