"""Odd but readable models through the CLI: each gets one `qcc: error:` line naming the tensor, node or type
(exit 2), or compiles (exit 0) to a model onnxruntime loads whose outputs match the input model's."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from compiler.cli import main
from compiler.export import encodings_document, read_encodings
from compiler.encoding import Encoding
from compiler.ir import QccError, load

ROOT = Path(__file__).resolve().parent.parent
ELEM = {np.float16: TensorProto.FLOAT16, np.float32: TensorProto.FLOAT, np.float64: TensorProto.DOUBLE}
FLOAT_PIPELINES = (["--passes", "fold-constants,cleanup,fold-bn,cle"], ["--target", "cpu"])


def save(tmp_path, model, name="model.onnx") -> Path:
    path = tmp_path / name
    onnx.save(model, path)
    return path


def parse(text) -> onnx.ModelProto:
    return onnx.parser.parse_model(text)


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, [line for line in err.splitlines() if line.startswith("qcc: error:")]


def assert_refused(capsys, *args, naming):
    code, errors = run_cli(capsys, *args)
    assert code == 2 and len(errors) == 1, errors
    for word in naming:
        assert word in errors[0], errors[0]
    return errors[0]


def feeds_for(session, rng, dtype=None):
    return {i.name: rng.normal(size=i.shape).astype(dtype or {"tensor(float)": np.float32, "tensor(float16)": np.float16,
                                                              "tensor(double)": np.float64}[i.type])
            for i in session.get_inputs()}


def assert_same_outputs(source: Path, compiled: Path, rtol: float | None, feeds=None):
    """The compiled model loads in onnxruntime and computes what the source model computes: within ``rtol`` of the
    largest output, or (rtol None: a quantized model) at a cosine of at least 0.99."""
    expected_session, actual_session = ort.InferenceSession(str(source)), ort.InferenceSession(str(compiled))
    feeds = feeds or feeds_for(expected_session, np.random.default_rng(1))
    for expected, actual in zip(expected_session.run(None, feeds), actual_session.run(None, feeds)):
        assert actual.dtype == expected.dtype
        if rtol is None:
            a, e = actual.astype(np.float64).ravel(), expected.astype(np.float64).ravel()
            assert a @ e / (np.linalg.norm(a) * np.linalg.norm(e)) >= 0.99
            continue
        scale = float(np.abs(expected.astype(np.float64)).max()) or 1.0
        assert np.abs(actual.astype(np.float64) - expected).max() <= rtol * scale


def layer_chain(dtype, op="Conv", w1=None):
    """l1 -> BatchNormalization -> Relu -> l2 (Conv or Gemm) in ``dtype``; l1's output channels span three orders of
    magnitude so that cle rescales them (and writes l1's bias)."""
    rng = np.random.default_rng(0)
    c = 4
    spread = np.array([0.1, 1, 5, 20])
    if op == "Conv":
        w1 = rng.normal(size=(c, 3, 3, 3)) * spread[:, None, None, None] if w1 is None else w1
        w2, x_shape, y_shape = rng.normal(size=(c, c, 1, 1)), [1, 3, 8, 8], [1, c, 8, 8]
        layers = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
                  helper.make_node("Conv", ["r", "w2", "b2"], ["y"], name="conv2")]
    else:
        w1 = rng.normal(size=(c, 3)) * spread[:, None] if w1 is None else w1
        w2, x_shape, y_shape = rng.normal(size=(c, c)), [2, 3], [2, c]
        layers = [helper.make_node("Gemm", ["x", "w1", "b1"], ["a"], name="gemm1", transB=1),
                  helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="gemm2", transB=1)]
    consts = {"w1": w1, "b1": rng.normal(size=c), "w2": w2, "b2": rng.normal(size=c), "gamma": rng.uniform(0.5, 2, c),
              "beta": rng.normal(size=c), "mean": rng.normal(size=c), "var": rng.uniform(0.5, 2, c)}
    nodes = [layers[0], helper.make_node("BatchNormalization", ["a", "gamma", "beta", "mean", "var"], ["n"], name="bn"),
             helper.make_node("Relu", ["n"], ["r"], name="relu"), layers[1]]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", ELEM[dtype], x_shape)],
                              [helper.make_tensor_value_info("y", ELEM[dtype], y_shape)],
                              [numpy_helper.from_array(np.asarray(v).astype(dtype), k) for k, v in consts.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def calib_folder(tmp_path, model, count=2, scale=1.0, dtype=np.float32, extra=()) -> Path:
    """``count`` samples of noise times ``scale`` for the inputs without a default; ``extra[i]``: sample i's others."""
    folder = tmp_path / "calib"
    folder.mkdir()
    rng = np.random.default_rng(2)
    for i in range(count):
        arrays = {vi.name: (rng.normal(size=[d.dim_value for d in vi.type.tensor_type.shape.dim]) * scale).astype(dtype)
                  for vi in model.graph.input if vi.name not in {t.name for t in model.graph.initializer}}
        np.savez(folder / f"{i}.npz", **arrays, **(extra[i] if extra else {}))
    return folder


# --- contrib ops: sympy optional, nothing written to the working directory ---------------------------------

GELU = """
<ir_version: 8, opset_import: ["" : 13, "com.microsoft" : 1]>
g (float[1,4] x) => (float[1,4] y) {
  g1 = com.microsoft.Gelu(x)
  y = Relu(g1)
}
"""

HIDE_SYMPY_AND_TORCH = """
import sys
class Hidden:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('sympy', 'torch'):
            raise ImportError(f'{name} is hidden')
sys.meta_path.insert(0, Hidden())
from compiler.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_contrib_op_compiles_without_sympy_or_torch(tmp_path):
    source = save(tmp_path, parse(GELU))
    out, cwd = tmp_path / "out" / "gelu.onnx", tmp_path / "cwd"
    out.parent.mkdir()
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", HIDE_SYMPY_AND_TORCH, "compile", str(source), "-o", str(out),
                             "--target", "cpu"], cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    notes = [line for line in result.stderr.splitlines() if "sympy is not installed" in line]
    assert len(notes) == 1 and "com.microsoft.Gelu" in notes[0]
    assert_same_outputs(source, out, 1e-6)
    assert os.listdir(cwd) == []


def test_symbolic_inference_leaves_nothing_in_the_working_directory(tmp_path, monkeypatch, capsys):
    """onnxruntime's symbolic inference saves sym_shape_infer_temp.onnx where it runs when an op is unknown to it."""
    source = save(tmp_path, parse("""
        <ir_version: 8, opset_import: ["" : 13, "custom.domain" : 1]>
        g (float[1,4] x) => (float[1,4] y) {
          c = custom.domain.Mystery(x)
          y = Relu(c)
        }"""))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert run_cli(capsys, "print", source)[0] == 0
    assert os.listdir(cwd) == []
    assert Path.cwd() == cwd


# --- refused at load, naming what is wrong ---------------------------------------------------------------

def test_conv_with_empty_weight_is_refused_when_compiled_and_printed_as_it_is(tmp_path, capsys):
    model = layer_chain(np.float32, w1=np.zeros((0, 3, 3, 3)))
    source = save(tmp_path, model)
    assert_refused(capsys, "compile", source, "-o", tmp_path / "o.onnx", "--target", "cpu", naming=["conv1", "'w1'", "empty"])
    assert main(["print", str(source)]) == 0
    assert "@w1: float32[0,3,3,3]" in capsys.readouterr().out


def test_bfloat16_model_is_refused(tmp_path, capsys):
    source = save(tmp_path, parse("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (bfloat16[1,4] x) => (bfloat16[1,4] y) { y = Relu(x) }"""))
    for command in (["compile", source, "-o", tmp_path / "o.onnx", "--target", "cpu"], ["print", source]):
        assert_refused(capsys, *command, naming=["'x'", "bfloat16"])
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("where,value,words", [
    ("w1", np.nan, ["initializer 'w1' holds NaN"]),
    ("w2", np.inf, ["initializer 'w2' holds Inf"]),
    ("var", np.nan, ["initializer 'var' holds NaN"]),
    ("var", -1.0, ["'bn'", "variance 'var'", "negative"]),
])
@pytest.mark.parametrize("target", ["cpu", "htp"])
def test_non_finite_constants_are_refused(tmp_path, capsys, where, value, words, target):
    model = layer_chain(np.float32)
    tensor = next(t for t in model.graph.initializer if t.name == where)
    values = numpy_helper.to_array(tensor).copy()
    values.flat[1] = value
    tensor.CopyFrom(numpy_helper.from_array(values, where))
    source = save(tmp_path, model)
    assert_refused(capsys, "compile", source, "-o", tmp_path / "o.onnx", "--target", target,
                   "--calib-data", calib_folder(tmp_path, model), naming=words)


def test_nan_in_a_constant_node_is_refused(tmp_path, capsys):
    """paddle2onnx writes weights as Constant nodes, not initializers."""
    source = save(tmp_path, parse("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[1,2] x) => (float[1,2] y) {
          k = Constant <value = float[2] {1, nan}> ()
          y = Mul(x, k)
        }"""))
    assert_refused(capsys, "compile", source, "-o", tmp_path / "o.onnx", "--target", "cpu",
                   naming=["constant 'k' holds NaN"])


def test_int32_conv_weight_is_refused(tmp_path, capsys):
    model = layer_chain(np.float32)
    weight = next(t for t in model.graph.initializer if t.name == "w2")
    weight.CopyFrom(numpy_helper.from_array(np.ones((4, 4, 1, 1), np.int32), "w2"))
    source = save(tmp_path, model)
    assert_refused(capsys, "compile", source, "-o", tmp_path / "o.onnx", "--target", "cpu",
                   naming=["conv2", "'w2'", "int32"])


# --- float16 / float64 models keep their float type ---------------------------------------------------------

@pytest.mark.parametrize("dtype,op", [(np.float16, "Conv"), (np.float16, "Gemm"), (np.float64, "Gemm")])
@pytest.mark.parametrize("pipeline", FLOAT_PIPELINES, ids=["fold-bn-cle", "cpu"])
def test_float_rewrites_keep_the_model_float_type(tmp_path, capsys, dtype, op, pipeline):
    source = save(tmp_path, layer_chain(dtype, op))
    out = tmp_path / "o.onnx"
    code, errors = run_cli(capsys, "compile", source, "-o", out, *pipeline)
    assert code == 0, errors
    assert_same_outputs(source, out, 1e-2 if dtype == np.float16 else 1e-9)
    compiled = onnx.load(out)
    assert {t.data_type for t in compiled.graph.initializer} == {ELEM[dtype]}


@pytest.mark.parametrize("dtype,op", [(np.float16, "Conv"), (np.float64, "Gemm")])
def test_quantizing_another_float_type_is_refused_before_the_first_pass(tmp_path, capsys, dtype, op):
    model = layer_chain(dtype, op)
    source = save(tmp_path, model)
    code = main([str(a) for a in ("compile", source, "-o", tmp_path / "o.onnx", "--target", "htp",
                                  "--calib-data", calib_folder(tmp_path, model, dtype=dtype))])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "[1/" not in err  # no pass ran
    errors = [line for line in err.splitlines() if line.startswith("qcc: error:")]
    assert len(errors) == 1 and f"'x' is {np.dtype(dtype).name}" in errors[0] and "float32" in errors[0]


# --- calibration data ------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["mse", "percentile", "entropy"])
def test_denormal_calibration_samples(tmp_path, capsys, method):
    model = layer_chain(np.float32)
    source = save(tmp_path, model)
    out = tmp_path / "o.onnx"
    code, errors = run_cli(capsys, "compile", source, "-o", out, "--target", "htp", "--calib-method", method,
                           "--calib-data", calib_folder(tmp_path, model, scale=1e-40))
    assert code == 0, errors
    ort.InferenceSession(str(out))


# --- encodings files never hold NaN or Inf -----------------------------------------------------------------

def test_encodings_with_nan_or_inf_are_neither_written_nor_read(tmp_path):
    module = load(save(tmp_path, parse("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[1,4] x) => (float[1,4] y) {
          s = Constant <value = float {0.5}> ()
          z = Constant <value = uint8 {0}> ()
          q = QuantizeLinear(x, s, z)
          y = DequantizeLinear(q, s, z)
        }""")))
    assert encodings_document(module)["activation_encodings"]
    for node in module.graph.nodes:
        if node.op == "Constant" and node.outputs[0].name == "s":
            node.attrs["value"].values = np.array(np.nan, np.float32)
    with pytest.raises(QccError, match="scale nan"):
        encodings_document(module)
    for bad in ("NaN", "Infinity", "-1.0"):
        path = tmp_path / "bad.encodings"
        path.write_text('{"activation_encodings": [{"name": "x", "dtype": "INT", "enc_type": "PER_TENSOR", '
                        f'"is_sym": false, "bw": 8, "scale": [{bad}], "offset": [0]}}], "param_encodings": []}}')
        with pytest.raises(QccError, match="'x' has scale"):
            read_encodings(path)
    good = tmp_path / "good.encodings"
    good.write_text(json.dumps({"activation_encodings": [{"name": "x", "dtype": "INT", "enc_type": "PER_TENSOR",
                                                          "is_sym": False, "bw": 8, "scale": [0.5], "offset": [0]}]}))
    assert read_encodings(good)[0]["x"] == Encoding(bw=8, scale=(0.5,), offset=(0,))


# --- a graph input with a default (an initializer of the same name) stays an input -------------------------

OVERRIDABLE = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[1,3,8,8] x, float[1,4,1,1] bias) => (float[1,4,8,8] y) <float[1,4,1,1] bias = {1, 2, 3, 4},
                                                                 float[4,3,1,1] w = {1,0,0, 0,1,0, 0,0,1, 1,1,1}> {
  c = Conv(x, w)
  a = Add(c, bias)
  y = Relu(a)
}
"""


def interface(model: onnx.ModelProto):
    def describe(values):
        return [(v.name, v.type.tensor_type.elem_type, [d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values]
    return describe(model.graph.input), describe(model.graph.output)


@pytest.mark.parametrize("target", ["cpu", "htp"])
def test_graph_input_with_default_keeps_the_interface(tmp_path, capsys, target):
    model = parse(OVERRIDABLE)
    source = save(tmp_path, model)
    out = tmp_path / "o.onnx"
    default = np.arange(1, 5, dtype=np.float32).reshape(1, 4, 1, 1)
    override = np.full((1, 4, 1, 1), -1.0, np.float32)
    calib = calib_folder(tmp_path, model, extra=[{"bias": default}, {"bias": override}])
    code, errors = run_cli(capsys, "compile", source, "-o", out, "--target", target, "--calib-data", calib)
    assert code == 0, errors
    compiled = onnx.load(out)
    assert interface(compiled) == interface(model)
    assert "bias" in {t.name for t in compiled.graph.initializer}  # the default is kept
    x = np.random.default_rng(3).normal(size=(1, 3, 8, 8)).astype(np.float32)
    rtol = 1e-6 if target == "cpu" else None
    assert_same_outputs(source, out, rtol, feeds={"x": x})
    assert_same_outputs(source, out, rtol, feeds={"x": x, "bias": override})
