"""qcc compare-dump: finds the first tensor where a device dump leaves the simulation.

Dumps are written the way qnn-net-run names them (sanitised tensor names, float32 .raw): from the
CPU simulation itself, from the same with one tensor corrupted, and from onnxruntime-qnn's HTP
backend (skipped when onnxruntime_qnn is not installed).
"""
import json

import numpy as np
import onnx
import pytest

from compiler.cli import main
from compiler.compare_dump import compare_dump, sanitize, write_dump
from compiler.runtime import make_session
from test_analyze import conv_net, ort_qdq, samples

QUANTIZED = ["x", "r1", "r2", "r3"]  # quantized activations; the output c4 keeps its name on its DQ


@pytest.fixture(scope="module")
def qdq(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dump")
    _, path = ort_qdq(conv_net(), folder, "net")
    sample = samples(1, seed=3)[0]
    np.save(folder / "input.npy", sample["x"])
    return path, folder / "input.npy", sample


def device_names(model: onnx.ModelProto) -> dict[str, str]:
    """Tensor name a device would dump -> the QUANT tensor holding that value: the quantized tensors by
    their own names (the DQ outputs' values), the output by its name."""
    producer = {o: n for n in model.graph.node for o in n.output}
    names = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in producer:
            q = producer[node.input[0]]
            names[q.input[0] if q.input[0] in QUANTIZED else node.output[0]] = node.output[0]
    return names


def simulated_dump(path, sample, folder, corrupt=()):
    model = onnx.load(path)
    names = device_names(model)
    values = dict(zip(names.values(), make_session(model, list(names.values())).run(list(names.values()), sample)))
    tensors = {device: values[quant] for device, quant in names.items()}
    rng = np.random.default_rng(0)
    for name in corrupt:
        tensors[name] = tensors[name] * 1.5 + rng.standard_normal(tensors[name].shape).astype(np.float32)
    write_dump(folder, tensors)
    return folder


def test_file_names_follow_qnn_net_run():
    assert sanitize("conv1/out:0") == "conv1_out_0"
    assert sanitize("p2o.Add.11") == "p2o_Add_11"


def test_simulated_dump_agrees(qdq, tmp_path):
    path, _, sample = qdq
    result = compare_dump(onnx.load(path), simulated_dump(path, sample, tmp_path / "d"), sample, {"cos": 0.99})
    assert result.first_divergence is None
    assert len(result.tensors) == 5 and result.unmatched_files == [] and result.problems == []
    assert all(t.max_abs == 0 for t in result.tensors)


def test_first_divergence_is_the_corrupted_tensor(qdq, tmp_path, capsys):
    path, data, sample = qdq
    # A device bug at r2 also spoils everything downstream: the first one in topological order is named.
    dump = simulated_dump(path, sample, tmp_path / "d", corrupt=["r3", "r2", "c4"])
    (dump / "not_a_tensor.raw").write_bytes(np.zeros(3, np.float32).tobytes())
    code = main(["compare-dump", str(path), str(dump), "--data", str(data), "--json", str(tmp_path / "c.json")])
    out = capsys.readouterr().out
    assert code == 1
    marked = [line for line in out.splitlines() if line.endswith("<-- first divergence")]
    assert len(marked) == 1 and marked[0].startswith("r2 ")
    assert out.splitlines()[-1] == "first divergence: r2.raw (Conv output; simulated as 'r2_DequantizeLinear_Output')"
    report = json.loads((tmp_path / "c.json").read_text())
    assert report["first_divergence"] == "r2_DequantizeLinear_Output"
    assert [t["diverged"] for t in report["tensors"]] == [False, False, True, True, True]
    assert report["unmatched_files"] == ["not_a_tensor"]
    # Without --data, the dumped graph input is the input.
    assert main(["compare-dump", str(path), str(dump), "-q"]) == 1
    assert main(["compare-dump", str(path), str(dump), "-q", "--threshold", "cos=-1"]) == 0


def test_wrong_sizes_and_missing_input_are_reported(qdq, tmp_path, capsys):
    path, _, sample = qdq
    dump = simulated_dump(path, sample, tmp_path / "d")
    (dump / "r1.raw").write_bytes(np.zeros(7, np.float32).tobytes())
    result = compare_dump(onnx.load(path), dump, sample, {"cos": 0.99})
    assert any("r1.raw: 7 values" in p for p in result.problems)
    (dump / "x.raw").unlink()
    assert main(["compare-dump", str(path), str(dump)]) == 2
    assert "--data" in capsys.readouterr().err


def test_htp_dump(qdq, tmp_path):
    from compiler.runtime import expose_tensors
    htp = pytest.importorskip("compiler.htp")
    pytest.importorskip("onnxruntime_qnn")
    path, _, sample = qdq
    model = onnx.load(path)
    names = device_names(model)
    # Intermediates leave the HTP graph as outputs of their DequantizeLinear nodes.
    session = htp.htp_session(expose_tensors(model, list(names.values())))
    values = dict(zip(names.values(), session.run(list(names.values()), sample)))
    write_dump(tmp_path / "htp", {device: values[quant] for device, quant in names.items()})
    result = compare_dump(model, tmp_path / "htp", sample, {"cos": 0.99})
    assert result.first_divergence is None and len(result.tensors) == 5
    # Integer arithmetic on HTP differs from the simulation by a few quantization steps, not more.
    assert all(t.max_steps is None or t.max_steps <= 4 for t in result.tensors)
    assert min(t.cos for t in result.tensors) > 0.999
