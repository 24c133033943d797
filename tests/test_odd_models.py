"""Every odd model of tests/odd_models.py through `qcc print`, `compile --target cpu` and `compile --target htp`.

Each run either exits 0 with a model onnxruntime loads (cpu: same outputs as the input model; htp: finite
outputs) and the input's interface, or exits 2 with one `qcc: error:` line naming what is wrong. Never a
traceback; the input's bytes stay as they were; a failed compile leaves no file; nothing lands in the working
directory.
"""
import hashlib
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from compiler.cli import main
from tests.odd_models import CASES, OK

SIDECARS = (".encodings", ".report.json", ".float.onnx")
DYNAMIC_DIM = 8


def _params():
    for name, case in CASES.items():
        for command, expected in case.expect.items():
            if case.slow and command == "htp":
                continue  # about a minute of calibration; print and cpu cover the graph's size
            marks = [pytest.mark.xfail(reason=case.xfail[command], strict=True)] if command in case.xfail else []
            yield pytest.param(name, command, expected, id=f"{name}-{command}", marks=marks)


def _snapshot(folder):
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _input_values(model: onnx.ModelProto) -> list:
    initializers = {i.name for i in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in initializers]


def _sample(model: onnx.ModelProto, case, rng) -> dict:
    if case.sample is not None:
        return case.sample(rng)
    sample = {}
    for value in _input_values(model):
        tensor = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (1 if i == 0 else DYNAMIC_DIM)
                 for i, d in enumerate(tensor.shape.dim)]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)
        if dtype == np.bool_:
            sample[value.name] = rng.random(shape) < 0.5
        elif np.issubdtype(dtype, np.integer):
            sample[value.name] = rng.integers(0, 4, shape).astype(dtype)
        else:
            sample[value.name] = rng.standard_normal(shape).astype(dtype)
    return sample


def _write_samples(folder, samples):
    folder.mkdir()
    for i, sample in enumerate(samples):
        if len(sample) == 1:
            np.save(folder / f"{i:02d}.npy", next(iter(sample.values())))
        else:
            np.savez(folder / f"{i:02d}.npz", **sample)


def _run(session, sample):
    wanted = {i.name for i in session.get_inputs()}
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {k: v for k, v in sample.items() if k in wanted})))


def _session(model):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _reference_session(path):
    """The input model in onnxruntime, its nodes renamed (ONNX allows two nodes one name; onnxruntime does not)."""
    model = onnx.load(str(path))
    for i, node in enumerate(model.graph.node):
        node.name = f"node{i}"
    return _session(model.SerializeToString())


def _check_interface(source: onnx.ModelProto, written: onnx.ModelProto):
    assert [v.name for v in _input_values(written)] == [v.name for v in _input_values(source)]
    assert [v.name for v in written.graph.output] == [v.name for v in source.graph.output]


@pytest.mark.parametrize("name,command,expected", list(_params()))
def test_odd_model(name, command, expected, tmp_path, monkeypatch, capsys):
    case = CASES[name]
    model_dir, out_dir, cwd = tmp_path / "model", tmp_path / "out", tmp_path / "cwd"
    for folder in (model_dir, out_dir, cwd):
        folder.mkdir()
    built = case.build(model_dir)
    model_path = model_dir / "model.onnx"
    if isinstance(built, onnx.ModelProto):
        onnx.save(built, model_path)
    else:
        model_path = built
    source = onnx.load(str(model_path), load_external_data=False)
    rng = np.random.default_rng(0)
    samples = [_sample(source, case, rng) for _ in range(3)]
    _write_samples(tmp_path / "calib", samples)
    before = _snapshot(model_dir)
    monkeypatch.chdir(cwd)

    out = out_dir / "out.onnx"
    shapes = [arg for shape in case.input_shapes for arg in ("--input-shape", shape)]
    if command == "print":
        argv = ["print", str(model_path)] + shapes
    else:
        argv = ["compile", str(model_path), "-o", str(out), "--target", command, "-q"] + shapes
        if command == "htp":
            argv += ["--calib-data", str(tmp_path / "calib")]
    code = main(argv)
    captured = capsys.readouterr()

    assert _snapshot(model_dir) == before, "the input model's files changed"
    assert list(cwd.iterdir()) == [], "files written to the working directory"
    if expected == OK:
        assert code == 0, captured.err
        if command == "print":
            assert captured.out.startswith("module opset=")
            return
        written = {p.name for p in out_dir.iterdir()}
        assert written <= {"out.onnx"} | {"out" + s for s in SIDECARS}, written
        assert "out.onnx" in written
        _check_interface(source, onnx.load(str(out)))
        compiled = _session(str(out))
        if command == "cpu":
            reference = _reference_session(model_path)
            for sample in samples:
                want, got = _run(reference, sample), _run(compiled, sample)
                for key in want:
                    tol = 1e-2 if want[key].dtype == np.float16 else 1e-4
                    np.testing.assert_allclose(got[key], want[key], rtol=tol, atol=tol, err_msg=key)
        else:
            for sample in samples:
                for key, value in _run(compiled, sample).items():
                    if np.issubdtype(value.dtype, np.floating):
                        assert np.isfinite(value).all(), key
    else:
        pattern = expected.split(":", 1)[1]
        assert code == 2, captured.err
        errors = [line for line in captured.err.splitlines() if line.startswith("qcc: error:")]
        assert len(errors) == 1, captured.err
        assert "Traceback" not in captured.err
        assert re.search(pattern, errors[0]), errors[0]
        assert list(out_dir.iterdir()) == [], "a failed compile left files behind"
