"""qcc run-htp / compiler.htp: QDQ models on onnxruntime-qnn's HTP backend with CPU fallback disabled.

Everything but the missing-package test is skipped when onnxruntime_qnn is not installed.
"""
import json
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compiler.cli import main
from compiler.ir import QccError

ACT_RANGE = 6.0  # output activation range [-6, 6]


@pytest.fixture(scope="module")
def htp():
    pytest.importorskip("onnxruntime_qnn")
    from compiler import htp
    return htp


def _qdq(nodes, inits, tensor, scale, zero_point, out, bits=8):
    # 16-bit activations use the com.microsoft Q/DQ below opset 21, as insert-qdq writes them.
    dtype, domain, levels = (np.uint16, "com.microsoft", 65535) if bits == 16 else (np.uint8, "", 255)
    inits += [numpy_helper.from_array(np.array(scale * 255 / levels, np.float32), f"{tensor}_scale"),
              numpy_helper.from_array(np.array(zero_point * (levels + 1) // 256, dtype), f"{tensor}_zp")]
    nodes += [helper.make_node("QuantizeLinear", [tensor, f"{tensor}_scale", f"{tensor}_zp"], [f"{tensor}_q"], domain=domain),
              helper.make_node("DequantizeLinear", [f"{tensor}_q", f"{tensor}_scale", f"{tensor}_zp"], [out], domain=domain)]


def qdq_conv(weight_axis=0, middle_op=None, float_divisor=False, act_bits=8) -> onnx.ModelProto:
    """x -> QDQ(u8) -> Conv 3x3 (int8 per-channel weights along ``weight_axis``, int32 bias) -> QDQ(u8) -> y.
    ``middle_op`` puts that op (quantized) before the Conv; ``float_divisor`` a Div by a float constant;
    ``act_bits=16`` makes the activations uint16."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    _qdq(nodes, inits, "x", 2 / 255, 128, "x_dq", act_bits)
    conv_input = "x_dq"
    if middle_op:
        nodes.append(helper.make_node(middle_op, ["x_dq"], ["m"]))
        _qdq(nodes, inits, "m", 2 / 255, 128, "m_dq")
        conv_input = "m_dq"
    if float_divisor:
        inits.append(numpy_helper.from_array(np.array(2.0, np.float32), "two"))
        nodes.append(helper.make_node("Div", [conv_input, "two"], ["d"]))
        _qdq(nodes, inits, "d", 1 / 255, 128, "d_dq")
        conv_input = "d_dq"
    weights = rng.standard_normal((16, 8, 3, 3)).astype(np.float32) * 0.2
    reduce = tuple(i for i in range(4) if i != weight_axis)
    w_scale = (np.abs(weights).max(axis=reduce) / 127).astype(np.float32)
    shape = [-1 if i == weight_axis else 1 for i in range(4)]
    w_q = np.clip(np.round(weights / w_scale.reshape(shape)), -127, 127).astype(np.int8)
    x_step = 2 / (2 ** act_bits - 1)
    b_scale = (np.float32(x_step) * w_scale).astype(np.float32) if weight_axis == 0 else np.float32(x_step * w_scale.max())
    b_q = np.round(rng.standard_normal(16) * 0.1 / b_scale).astype(np.int32)
    inits += [numpy_helper.from_array(w_q, "w_q"), numpy_helper.from_array(w_scale, "w_scale"),
              numpy_helper.from_array(np.zeros_like(w_q, shape=w_scale.shape), "w_zp"),
              numpy_helper.from_array(b_q, "b_q"), numpy_helper.from_array(np.asarray(b_scale, np.float32), "b_scale"),
              numpy_helper.from_array(np.zeros_like(b_q, shape=np.shape(b_scale)), "b_zp")]
    nodes += [helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w"], axis=weight_axis),
              helper.make_node("DequantizeLinear", ["b_q", "b_scale", "b_zp"], ["b"], axis=0),
              helper.make_node("Conv", [conv_input, "w", "b"], ["c"], pads=[1, 1, 1, 1])]
    _qdq(nodes, inits, "c", 2 * ACT_RANGE / 255, 128, "y", act_bits)
    graph = helper.make_graph(nodes, "qdq_conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 16, 16])], inits)
    opsets = [helper.make_opsetid("", 13)] + ([helper.make_opsetid("com.microsoft", 1)] if act_bits == 16 else [])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def samples(count):
    rng = np.random.default_rng(1)
    return [{"x": rng.uniform(-1, 1, (1, 8, 16, 16)).astype(np.float32)} for _ in range(count)]


def test_conv_runs_on_htp_and_agrees_with_cpu_simulation(htp):
    rows, seconds = htp.compare_with_cpu(qdq_conv(), samples(2))
    (row,) = rows
    assert row.name == "y" and row.step == pytest.approx(2 * ACT_RANGE / 255)
    # HTP's integer arithmetic may round differently from the float simulation, by a step or so.
    assert row.max_steps <= 2
    assert row.cos_min > 0.999 and row.sqnr_db > 30
    assert seconds > 0


def test_16bit_conv_is_exact_on_v73(htp):
    # The backend simulates v68 by default, which computes 16-bit convolutions to ~20 steps; v73 to one.
    rows, _ = htp.compare_with_cpu(qdq_conv(act_bits=16), samples(1), {"htp_arch": "73"})
    assert rows[0].step == pytest.approx(2 * ACT_RANGE / 65535) and rows[0].max_steps <= 2


def test_wrong_per_channel_axis_names_the_conv_and_the_reason(htp):
    with pytest.raises(QccError, match=r"Conv \(output 'c'\).*axis == 0"):
        htp.htp_session(qdq_conv(weight_axis=1))


def test_op_htp_cannot_run_is_named(htp):
    with pytest.raises(QccError, match=r"cannot run the whole graph: Hardmax \(output 'm'\).*not supported"):
        htp.htp_session(qdq_conv(middle_op="Hardmax"))


def test_float_constant_between_quantized_ops_is_named_as_the_likely_cause(htp):
    with pytest.raises(QccError, match=r"Div \(output 'd'\) reads float constant 'two'"):
        htp.htp_session(qdq_conv(float_divisor=True))


def test_run_htp_command(htp, tmp_path, capsys):
    onnx.save(qdq_conv(), tmp_path / "conv.onnx")
    data = tmp_path / "data"
    data.mkdir()
    for i, sample in enumerate(samples(3)):
        np.save(data / f"s{i}.npy", sample["x"])
    assert main(["run-htp", str(tmp_path / "conv.onnx"), "--data", str(data), "--count", "2",
                 "--json", str(tmp_path / "out.json")]) == 0
    assert "2 sample(s)" in capsys.readouterr().out
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["samples"] == 2 and report["outputs"][0]["name"] == "y"
    assert report["outputs"][0]["max_steps"] <= 2


def test_run_htp_without_onnxruntime_qnn_says_how_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime_qnn", None)  # makes `import onnxruntime_qnn` fail
    onnx.save(qdq_conv(), tmp_path / "conv.onnx")
    assert main(["run-htp", str(tmp_path / "conv.onnx"), "--data", str(tmp_path)]) == 2
    assert "pip install 'qcc[qnn]'" in capsys.readouterr().err
