"""Every quantized compile ends on the QNN HTP backend of its generation (--htp-arch), and a model that
generation cannot run is refused before anything is written."""
import json

import numpy as np
import onnx
import onnx.parser
import onnx_graphsurgeon as gs
import pytest

from compiler import htp
from compiler.cli import main
from compiler.config import QuantConfig
from compiler.encoding import HTP_ARCHS
from compiler.errors import QccError
from compiler.data import Dataset, ImageOptions, specs_of, split_indices
from compiler.ir import from_onnx, infer_shapes, load
from compiler.judge import HELD_BACK_SHARE
from compiler.pass_manager import PassContext, PassManager, Pipeline, make_pass
from compiler.qdq import arch_problems
from compiler.runtime import make_session
from tests.conftest import CONV_MODEL

def compile_htp(work, *extra):
    return main(["compile", str(work / "m.onnx"), "-o", str(work / "o.onnx"), "--target", "htp", "-q",
                 "--calib-data", str(work / "data"), *map(str, extra)])


def report(work) -> dict:
    return json.loads((work / "o.report.json").read_text())


def test_a_real_model_compiled_for_v68_reports_htp_beside_the_simulation(assets, tmp_path):
    pytest.importorskip("onnxruntime_qnn")
    out = tmp_path / "cls.onnx"
    assert main(["compile", str(assets / "models" / "ppocr_cls.onnx"), "--target", "htp", "--htp-arch", "68",
                 "--input-shape", "x:1,3,48,192", "--calib-data", str(assets / "text_cls"), "--calib-count", "8",
                 "--eval-data", str(assets / "text_cls"), "--image-size", "48,192", "--image-mean", "0.5,0.5,0.5",
                 "--image-std", "0.5,0.5,0.5", "--htp-samples", "2", "--htp-search", "-o", str(out), "-q"]) == 0
    document = json.loads(out.with_name("cls.report.json").read_text())
    assert "htp-arch=68" in document["pipeline"]
    (check,) = document["htp"]["checks"]
    assert check["arch"] == "68" and check["status"] == "ran" and check["samples"] == 2
    assert document["htp"]["data"].startswith("held-out")
    (row,) = check["outputs"].values()
    assert row["htp_vs_fp32"]["cosine_mean"] > 0.98 and row["simulation_vs_fp32"]["cosine_mean"] > 0.98
    assert row["htp_vs_simulation"]["cosine_mean"] > 0.99 and row["htp_vs_simulation"]["max_steps"] >= 0
    # The layer-by-layer search runs where HTP loses accuracy the simulation promised (here HTP is the closer).
    search = check["divergence_search"]
    assert search["ran"] == (row["htp_vs_fp32"]["cosine_mean"] < row["simulation_vs_fp32"]["cosine_mean"] - 0.002)
    assert bool(check["first_divergences"]) <= search["ran"]
    # Where HTP parts from the simulation, layer by layer: tensors the compiled model quantizes, written by an op.
    compiled = onnx.load(out)
    float_module = load(assets / "models" / "ppocr_cls.onnx", {"x": [1, 3, 48, 192]})
    images = Dataset(assets / "text_cls", specs_of(float_module), count=1, image=ImageOptions((0.5,) * 3, (0.5,) * 3))
    divergences = htp.first_divergences(compiled, images[0], "68")
    quantized = {node.input[0] for node in compiled.graph.node if node.op_type == "QuantizeLinear"}
    ops = {node.output[0]: node.op_type for node in compiled.graph.node}
    assert divergences  # v68 computes cls's convolutions a few steps off the simulation
    for divergence in divergences:
        assert divergence["tensor"] in quantized and divergence["op"] == ops.get(divergence["tensor"], "input")
        assert divergence["cosine"] < htp.DIVERGENCE_COSINE


def check_rows(device: float, simulation: float) -> dict:
    return {"y": {"htp_vs_fp32": {"cosine_mean": device}, "simulation_vs_fp32": {"cosine_mean": simulation}}}


def test_the_layer_by_layer_search_runs_where_htp_loses_what_the_simulation_promised():
    loss = "on output y HTP's cosine to FP32 0.99000 is more than 0.002 below the simulation's 0.99500"
    assert htp.search_reason(check_rows(0.990, 0.995)) == {"ran": True, "loss": True, "why": loss}
    assert htp.search_reason(check_rows(0.990, 0.995), wanted=False) == {"ran": False, "loss": True, "why": loss}
    for device, simulation in ((0.994, 0.995), (0.999, 0.990), (None, 0.995)):
        search = htp.search_reason(check_rows(device, simulation))
        assert not search["ran"] and not search["loss"]
        assert "at most 0.002 below the simulation's on every output" in search["why"]


def test_all_checks_every_generation_by_the_oldest_rules(work, capsys):
    pytest.importorskip("onnxruntime_qnn")
    assert compile_htp(work, "--htp-arch", "all", "--htp-samples", "1") == 0
    document = report(work)
    assert "htp-arch=68" in document["pipeline"]
    assert [c["arch"] for c in document["htp"]["checks"]] == sorted(HTP_ARCHS, key=int)
    assert all(c["status"] == "ran" and c["samples"] == 1 for c in document["htp"]["checks"])


def test_by_default_the_check_runs_one_sample_and_searches_nothing(work):
    pytest.importorskip("onnxruntime_qnn")
    assert compile_htp(work) == 0
    (check,) = report(work)["htp"]["checks"]
    assert check["samples"] == 1 and check["first_divergences"] == [] and not check["divergence_search"]["ran"]


def test_the_check_is_printed_skipped_without_the_backend_and_off_on_request(work, capsys, monkeypatch):
    def missing():
        raise QccError(htp.INSTALL_HINT)
    monkeypatch.setattr(htp, "qnn_module", missing)
    assert main(["compile", str(work / "m.onnx"), "-o", str(work / "o.onnx"), "--target", "htp",
                 "--calib-data", str(work / "data")]) == 0
    assert "qcc: note: HTP check skipped: the QNN HTP backend needs the optional package onnxruntime-qnn" \
        in capsys.readouterr().err
    assert report(work)["htp"] == {"skipped": "onnxruntime-qnn is not installed"}
    assert compile_htp(work, "--no-htp-check", "--force") == 0
    assert report(work)["htp"] == {}


@pytest.mark.parametrize("flags, message", [
    (("--weight-bits", "16", "--act-bits", "16", "--htp-arch", "68"),
     "quant: 16-bit weight; HTP v68 takes 4 or 8-bit weights (16 needs v73 or later)"),
    (("--weight-bits", "16"), "quant: 16-bit weights need 16-bit activations on HTP")], ids=["v68", "w16a8"])
def test_sixteen_bit_weights_the_backend_refuses_are_refused_before_any_pass(work, capsys, flags, message):
    assert compile_htp(work, *flags) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "[1/" not in err and not (work / "o.onnx").exists()


def w16a16_conv():
    """CONV_MODEL lowered with 16-bit weights and activations."""
    module = from_onnx(infer_shapes(onnx.parser.parse_model(CONV_MODEL)))
    samples = [{"x": np.ones((1, 3, 8, 8), np.float32)}]
    pipeline = Pipeline([make_pass("calibrate", {"method": "minmax"}), make_pass("insert-qdq")],
                        QuantConfig(act_bits=16, weight_bits=16))
    PassManager(pipeline, quiet=True).run(module, PassContext(calib_data=samples, log=lambda m: None))
    return module


def test_a_layer_with_a_weight_the_generation_does_not_take_is_named():
    module = w16a16_conv()
    assert arch_problems(module, HTP_ARCHS["73"]) == []
    (problem,) = arch_problems(module, HTP_ARCHS["68"])
    assert "(Conv): 16-bit weight; HTP v68 takes 4 or 8-bit weights (16 needs v73 or later)" in problem


def test_a_layer_with_16_bit_weights_and_8_bit_activations_is_named():
    """A QDQ model made elsewhere (or a layer annotated by hand) is checked too: v73 refuses W16A8 layers."""
    module = w16a16_conv()
    for node in module.graph.nodes:  # the activations' DequantizeLinear nodes read back at 8 bits
        if node.op == "DequantizeLinear" and not isinstance(node.inputs[0], gs.Constant):
            node.inputs[2] = gs.Constant(node.inputs[2].name + "_8bit", np.zeros((), np.uint8))
    (problem,) = arch_problems(module, HTP_ARCHS["73"])
    assert "(Conv): 16-bit weight with 8-bit activations; HTP takes 16-bit weights at 16-bit activations only" in problem


def test_htp_arch_is_for_the_htp_target(work, capsys):
    code = main(["compile", str(work / "m.onnx"), "-o", str(work / "o.onnx"), "--target", "dsp", "--htp-arch", "73",
                 "--calib-data", str(work / "data")])
    assert code == 2 and "target 'dsp' is not HTP" in capsys.readouterr().err


def test_profile_shows_where_the_time_went(work, capsys):
    assert compile_htp(work, "--profile", "--no-htp-check") == 0
    table = capsys.readouterr().err.splitlines()
    stages = [line.split()[0] + (" " + line.split()[1] if line.startswith(("pass", "write")) else "") for line in table[1:-1]]
    assert stages[:2] == ["start-up", "load"] and "pass calibrate" in stages and "pass insert-qdq" in stages
    assert stages[-4:] == ["write compiled", "write encodings", "write float", "write report"]
    assert table[-1].startswith("total")
    assert set(report(work)["timings"]) >= {"start-up", "load", "evaluation", "write compiled model"}


def check_with(sim: float, device: float, search: bool = True) -> dict:
    row = lambda cos: {"cosine_mean": cos, "cosine_min": cos, "sqnr_db": 20.0}
    outputs = {"y": {"htp_vs_fp32": row(device), "simulation_vs_fp32": row(sim),
                     "htp_vs_simulation": {**row(0.99), "max_steps": 3.0}}}
    return {"arch": "73", "status": "ran", "samples": 4, "first_divergences": [], "outputs": outputs,
            "divergence_search": htp.search_reason(outputs, search)}


def test_a_device_further_from_fp32_than_the_simulation_is_pointed_out():
    lines = htp.check_lines(check_with(0.995, 0.987), "held-out sample(s)")
    assert lines[1] == ("HTP v73: on output y HTP's cosine to FP32 0.98700 is more than 0.002 below the simulation's "
                        "0.99500; --judge htp chooses calibration and bias correction on the device")
    lines = htp.check_lines(check_with(0.995, 0.987, search=False), "held-out sample(s)")
    assert len(lines) == 2 and lines[1].endswith("on the device, --htp-search finds where HTP parts from the simulation")
    for device in (0.994, 0.999):
        lines = htp.check_lines(check_with(0.995, device), "held-out sample(s)")
        assert len(lines) == 2 and "layer-by-layer search not run" in lines[1] and "--judge" not in lines[1]


def test_the_check_reuses_the_judges_cpu_runs_of_the_first_held_back_sample(work):
    """With --judge auto (8 samples or more) the judge already ran the chosen model and the FP32 reference on the
    first held-back sample, which is the check's: the check reads those outputs, and they equal its own runs."""
    pytest.importorskip("onnxruntime_qnn")
    rng = np.random.default_rng(1)
    for i in range(3, 12):
        np.save(work / "data" / f"s{i}.npy", rng.normal(size=(1, 3, 8, 8)).astype(np.float32))
    assert compile_htp(work) == 0
    document = report(work)
    assert document["judge"]["chosen"] and document["htp"]["data"].startswith("held-back")
    compiled = onnx.load(work / "o.onnx")
    (row,) = document["htp"]["checks"][0]["outputs"].values()
    # The held-back samples are every 4th (compiler.data.split_indices); the check runs the first of them.
    _, indices = split_indices(12, HELD_BACK_SHARE)
    first = Dataset(work / "data", specs_of(from_onnx(compiled)))[indices[0]]
    # HTP against the simulation does not read the FP32 reference: any float model stands in for it here.
    stand_in = onnx.load(work / "o.float.onnx")
    (fresh,) = htp.device_checks(compiled, stand_in, [first], ["73"])[0]["outputs"].values()
    assert fresh["htp_vs_simulation"] == row["htp_vs_simulation"]
    # Given outputs are read, not computed again: simulated outputs equal to the reference's make it exact.
    names = [o.name for o in stand_in.graph.output]
    fp32 = dict(zip(names, make_session(stand_in).run(names, first)))
    (given,) = htp.device_checks(compiled, stand_in, [first], ["73"], known=[(fp32, fp32)])[0]["outputs"].values()
    assert given["simulation_vs_fp32"]["cosine_mean"] == pytest.approx(1.0)
    assert given["htp_vs_fp32"] == fresh["htp_vs_fp32"]


WIDE_CONV = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[1,32,16,16] x) => (float[1,32,16,16] y) {
  c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
  y = Relu(c)
}
"""


def test_sixteen_bit_weights_are_what_htp_computes_exactly(tmp_path):
    """HTP computes a W16A16 convolution as its QDQ model says only with weight codes under 2^14 in magnitude
    (encoding.HTP_WEIGHT16_LEVELS); with codes up to 2^15 - 1 it lands up to 18 output steps off."""
    pytest.importorskip("onnxruntime_qnn")
    rng = np.random.default_rng(0)
    proto = onnx.parser.parse_model(WIDE_CONV)
    proto.graph.initializer.extend([onnx.numpy_helper.from_array((rng.standard_normal((32, 32, 3, 3)) * 0.1).astype(np.float32), "w"),
                                    onnx.numpy_helper.from_array((rng.standard_normal(32) * 0.5).astype(np.float32), "b")])
    onnx.save(proto, tmp_path / "m.onnx")
    (tmp_path / "data").mkdir()
    for i in range(4):
        np.save(tmp_path / "data" / f"s{i}.npy", rng.standard_normal((1, 32, 16, 16)).astype(np.float32))
    assert compile_htp(tmp_path, "--act-bits", "16", "--weight-bits", "16", "--htp-arch", "73", "--no-htp-check") == 0
    compiled = onnx.load(tmp_path / "o.onnx")
    codes = [onnx.numpy_helper.to_array(t) for t in compiled.graph.initializer if t.data_type == onnx.TensorProto.INT16]
    assert codes and max(int(np.abs(c.astype(np.int64)).max()) for c in codes) <= 2 ** 14 - 1
    sample = {"x": np.load(tmp_path / "data" / "s0.npy")}
    (cpu,) = make_session(compiled).run(["y"], sample)
    (device,), _ = htp.run_htp(compiled, [sample], {"htp_arch": "73"})
    step = float(onnx.numpy_helper.to_array(next(t for t in compiled.graph.initializer if t.name == next(
        n.input[1] for n in compiled.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == "y"))))
    assert np.max(np.abs(device["y"] - cpu)) / step < 4  # with codes up to 2^15 - 1: 36 steps


def layernorm_w16a16(tmp_path) -> onnx.ModelProto:
    """The LayerNorm test model compiled at --act-bits 16 --weight-bits 16."""
    from tests.test_promote_16bit import LAYERNORM
    rng = np.random.default_rng(3)
    proto = onnx.parser.parse_model(LAYERNORM)
    proto.graph.initializer.extend([onnx.numpy_helper.from_array(rng.uniform(0.5, 2, 8).astype(np.float32), "scale"),
                                    onnx.numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "shift")])
    onnx.save(proto, tmp_path / "m.onnx")
    (tmp_path / "data").mkdir()
    for i in range(4):
        np.save(tmp_path / "data" / f"s{i}.npy", rng.standard_normal((1, 6, 8)).astype(np.float32))
    assert compile_htp(tmp_path, "--act-bits", "16", "--weight-bits", "16", "--htp-arch", "73", "--no-htp-check") == 0
    return onnx.load(tmp_path / "o.onnx")


def layernorm_scale(compiled: onnx.ModelProto) -> onnx.NodeProto:
    (layernorm,) = [n for n in compiled.graph.node if n.op_type == "LayerNormalization"]
    return next(n for n in compiled.graph.node if n.output[0] == layernorm.input[1])


def test_at_16_bit_weights_a_layernorm_keeps_its_8_bit_scale_and_runs_on_htp(tmp_path):
    """--weight-bits 16 gives Conv, Gemm and MatMul 16-bit weights, but LayerNormalization's scale stays uint8:
    HTP v73 refuses a uint16 scale beside the int32 bias (PP-OCR rec at W16A16: every LayerNorm refused)."""
    compiled = layernorm_w16a16(tmp_path)
    stored = {t.name: t for t in compiled.graph.initializer}
    assert stored[layernorm_scale(compiled).input[0]].data_type == onnx.TensorProto.UINT8
    assert arch_problems(from_onnx(compiled), HTP_ARCHS["73"]) == []
    pytest.importorskip("onnxruntime_qnn")
    sample = {"x": np.load(tmp_path / "data" / "s0.npy")}
    (device,), _ = htp.run_htp(compiled, [sample], {"htp_arch": "73"})  # refused before: "Failed to add node"
    (cpu,) = make_session(compiled).run(["y"], sample)
    assert np.allclose(device["y"], cpu, atol=0.05 * float(np.abs(cpu).max()))


def test_a_layernorm_with_a_16_bit_scale_beside_an_int32_bias_is_named(tmp_path):
    compiled = layernorm_w16a16(tmp_path)
    dq = layernorm_scale(compiled)
    for tensor in compiled.graph.initializer:  # the scale stored at 16 bits, as a QDQ model made elsewhere may hold it
        value = onnx.numpy_helper.to_array(tensor)
        if tensor.name in (dq.input[0], dq.input[2]):
            tensor.CopyFrom(onnx.numpy_helper.from_array(value.astype(np.uint16) * 257, tensor.name))
        elif tensor.name == dq.input[1]:
            tensor.CopyFrom(onnx.numpy_helper.from_array((value / 257).astype(np.float32), tensor.name))
    (problem,) = arch_problems(from_onnx(compiled), HTP_ARCHS["73"])
    assert "(LayerNormalization): 16-bit scale beside an int32 bias; HTP takes the scale at 8 bits" in problem


def test_the_default_candidates_htp_session_is_built_while_the_judge_goes_on(work, monkeypatch):
    """With --judge auto the HTP check's session is built on another thread once the default candidate is
    exported, and the check takes it: one session, built off the main thread; the report is as without it."""
    import threading
    pytest.importorskip("onnxruntime_qnn")
    rng = np.random.default_rng(1)
    for i in range(3, 12):
        np.save(work / "data" / f"s{i}.npy", rng.normal(size=(1, 3, 8, 8)).astype(np.float32))
    assert compile_htp(work) == 0
    without = [check["outputs"] for check in report(work)["htp"]["checks"]]
    built = []
    real = htp.htp_session
    monkeypatch.setattr(htp, "htp_session", lambda *a, **k: built.append(threading.current_thread().name) or real(*a, **k))
    assert compile_htp(work, "--force") == 0
    document = report(work)
    assert document["judge"]["chosen"].startswith("calibrate=mse")  # the default, whose session was prepared
    assert len(built) == 1 and built[0] != threading.main_thread().name
    assert [check["outputs"] for check in document["htp"]["checks"]] == without
    assert htp.PreparedSession.current is None


def test_a_prepared_session_serves_only_its_own_model_and_options(work):
    pytest.importorskip("onnxruntime_qnn")
    rng = np.random.default_rng(1)
    for i in range(3, 12):
        np.save(work / "data" / f"s{i}.npy", rng.normal(size=(1, 3, 8, 8)).astype(np.float32))
    assert compile_htp(work, "--no-htp-check") == 0
    compiled = onnx.load(work / "o.onnx")
    other = onnx.load(work / "o.onnx")
    other.graph.name = "another"
    for model, options in ((other, {"htp_arch": "73"}), (compiled, {"htp_arch": "75"})):
        htp.PreparedSession.prepare(compiled, {"htp_arch": "73"})
        assert htp.PreparedSession.take(model, options) is None and htp.PreparedSession.current is None  # dropped
    htp.PreparedSession.prepare(compiled, {"htp_arch": "73"})
    assert htp.PreparedSession.take(compiled, {"htp_arch": "73"}) is not None and htp.PreparedSession.current is None
    htp.PreparedSession.prepare(compiled, {"htp_arch": "73"})
    htp.PreparedSession.discard()
    assert htp.PreparedSession.current is None


def test_no_session_is_built_in_advance_where_the_check_or_the_judge_builds_its_own():
    from compiler.cluster import LocalRunner
    from compiler.quantize import CompileRequest, _htp_session_in_advance
    pipeline = CompileRequest(target="htp").pipeline()
    assert _htp_session_in_advance(CompileRequest(target="htp"), pipeline, LocalRunner(), []) is not None
    for request in (CompileRequest(target="htp", judge="htp"), CompileRequest(target="htp", htp_check=False)):
        assert _htp_session_in_advance(request, pipeline, LocalRunner(), []) is None
    assert _htp_session_in_advance(CompileRequest(target="htp"), pipeline, type("Ray", (), {"workers": 2})(), []) is None
