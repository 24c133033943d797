"""Block reconstruction (brecq) and the torch simulation it runs on (compiler.torch_graph)."""
import importlib.util

import numpy as np
import pytest

from compiler.config import QuantConfig
from compiler.encoding import fake_quantize
from tests.golden_cases import GOLDEN_ROOT, GoldenCase
from compiler.ir import const_value, fix_input_shapes, from_onnx, infer_shapes, parse_input_shape
from compiler.pass_manager import PassContext, PassManager, parse_pipeline
from compiler.quantize import compile_model
from compiler.runtime import run_model, sample_inputs
from model_zoo import mbconv_se, nhwc_convnet, resnet_block, style_convnet, transformer_block, yolo_head, zoo
from compiler.targets import TARGETS
from passes.brecq import Brecq
from passes.propagate_encodings import PropagateEncodings

torch = pytest.importorskip("torch")
from compiler.torch_graph import TorchGraph  # noqa: E402  (needs torch)

QUIET = dict(log=lambda message: None)


@pytest.mark.parametrize("zoo_model", [resnet_block(9), mbconv_se(11), yolo_head(12), transformer_block(13),
                                       nhwc_convnet(13), style_convnet(13)], ids=lambda z: z.name)
def test_torch_simulation_equals_onnxruntime_on_the_qdq_model(zoo_model):
    module = from_onnx(infer_shapes(zoo_model.model))
    samples = sample_inputs(module, PassContext(seed=1), 3)
    compile_model(module, "htp", calib_data=samples)
    proto = module.to_onnx()
    simulation = TorchGraph(from_onnx(proto).graph)
    for sample, expected in zip(samples, run_model(proto, samples)):
        values = simulation.run({name: torch.from_numpy(value) for name, value in sample.items()})
        for name, value in expected.items():
            np.testing.assert_allclose(values[name].numpy(), value, atol=1e-5)


@pytest.mark.parametrize("zoo_model", zoo(), ids=lambda z: z.name)
def test_runs_in_the_htp_pipeline_on_every_zoo_model(zoo_model):
    """Opsets 9-17, NHWC, dynamic shapes, attention: every weighted layer learned, nothing declined."""
    proto = fix_input_shapes(zoo_model.model, dict(parse_input_shape(text) for text in zoo_model.input_shapes))
    module = from_onnx(infer_shapes(proto))
    samples = sample_inputs(module, PassContext(seed=1), 4)
    passes = str(TARGETS["htp"].build(act_bits=8)).replace(",bias-correction", ",brecq{iterations=3 samples=4},bias-correction")
    result = compile_model(module, "htp", calib_data=samples, passes=passes)
    (record,) = [r for r in result.manager.records if r.name == "brecq"]
    weighted = sum(n.op in ("Conv", "ConvTranspose", "Gemm", "MatMul") and n.inputs[1].inputs and n.inputs[1].inputs[0].op == "DequantizeLinear"
                   and not n.inputs[1].inputs[0].inputs[0].inputs for n in module.graph.nodes)
    assert record.modified and record.stats["layers"] == weighted, record.stats
    assert not [r for r in result.context.remarks if r.pass_name == "brecq"]


def conv_and_matmul():
    return GoldenCase(GOLDEN_ROOT / "adaround" / "conv_and_matmul").load_input()


def quantized_error(module, samples, reference, bits=4) -> float:
    """Mean squared output error of the QDQ model insert-qdq writes from ``module``."""
    qdq = module.clone()
    PassManager(parse_pipeline(f"quant{{weight-bits={bits}}},propagate-encodings,insert-qdq"), quiet=True).run(
        qdq, PassContext(**QUIET))
    got = run_model(qdq, samples)
    return float(np.mean([np.mean((g["y"] - r["y"]) ** 2) for g, r in zip(got, reference)]))


def calibrated(samples):
    module = conv_and_matmul()
    PassManager(parse_pipeline("calibrate{method=minmax}"), quiet=True).run(module, PassContext(calib_data=samples, **QUIET))
    return module


def run_brecq(module, samples, **options):
    ctx = PassContext(calib_data=samples, config=QuantConfig(weight_bits=4), **QUIET)
    options = {"iterations": 200, "lr": 0.05, **options}
    result = Brecq(Brecq.Options(**{k.replace("-", "_"): v for k, v in options.items()})).run(module, ctx)
    return result, ctx


def test_learned_rounding_beats_nearest_on_the_quantized_output():
    samples = sample_inputs(conv_and_matmul(), PassContext(seed=3), 16)
    held = sample_inputs(conv_and_matmul(), PassContext(seed=4), 16)
    reference = run_model(conv_and_matmul(), held)
    nearest = calibrated(samples)
    learned = calibrated(samples)
    result, _ = run_brecq(learned, samples, drop=0.0)
    assert result.modified and result.stats["layers"] == 2 and result.stats["flipped-percent"] > 0
    assert result.stats["error-ratio-mean"] < 1.0
    assert quantized_error(learned, held, reference) < quantized_error(nearest, held, reference)


def test_weights_land_on_their_grid_deterministically_and_a_second_run_changes_nothing():
    samples = sample_inputs(conv_and_matmul(), PassContext(seed=3), 8)
    first, second = calibrated(samples), calibrated(samples)
    run_brecq(first, samples, iterations=40)
    run_brecq(second, samples, iterations=40)
    for name in ("w", "wm"):
        weight = const_value(first.graph.tensors()[name])
        assert np.array_equal(fake_quantize(weight, first.encodings[name]), weight)  # quantizing again is exact
        assert np.array_equal(weight, const_value(second.graph.tensors()[name]))
    assert first.encodings["w"].axis == 0 and first.encodings["wm"].axis is None  # as insert-qdq quantizes them
    again, _ = run_brecq(first, samples, iterations=40)
    assert not again.modified


def test_blocks_split_at_single_live_quantized_tensors():
    """resnet_block: the stem and each residual block's output are the only tensors alive between blocks."""
    zoo_model = resnet_block(9)
    module = from_onnx(infer_shapes(zoo_model.model))
    samples = sample_inputs(module, PassContext(seed=1), 4)
    PassManager(parse_pipeline("fold-constants,fold-bn,calibrate{method=minmax}"), quiet=True).run(
        module, PassContext(calib_data=samples, **QUIET))
    manager = PassManager(parse_pipeline("brecq{iterations=2 block-layers=1}"), quiet=True)
    manager.run(module, PassContext(calib_data=samples, **QUIET))
    (record,) = manager.records
    # 6 convs and the Gemm; the shortcut's conv shares a block with the branch it skips
    assert record.stats["layers"] == 7
    assert 3 <= record.stats["blocks"] < 7


def test_declines_with_a_remark_without_calibration_or_torch(monkeypatch):
    samples = sample_inputs(conv_and_matmul(), PassContext(seed=3), 4)
    uncalibrated = conv_and_matmul()
    result, ctx = run_brecq(uncalibrated, samples)
    assert not result.modified and "run calibrate first" in ctx.remarks[0].message
    result, ctx = run_brecq(calibrated(samples), None)
    assert not result.modified and "calibration data" in ctx.remarks[0].message
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real_find_spec(name, *a))
    result, ctx = run_brecq(calibrated(samples), samples)
    assert not result.modified and "needs PyTorch" in ctx.remarks[0].message


def test_an_op_the_simulation_lacks_is_a_remark_naming_the_node():
    import onnx
    from onnx import helper
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), helper.make_node("Mod", ["c", "k"], ["y"], name="mod", fmod=1)],
        "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2, 4, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2, 4, 4])],
        [onnx.numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "w"),
         onnx.numpy_helper.from_array(np.full((1,), 3.0, np.float32), "k")])
    module = from_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    samples = sample_inputs(module, PassContext(seed=1), 2)
    PassManager(parse_pipeline("calibrate{method=minmax}"), quiet=True).run(module, PassContext(calib_data=samples, **QUIET))
    result, ctx = run_brecq(module, samples)
    assert not result.modified
    assert any(r.where.startswith("mod") and "Mod" in r.message for r in ctx.remarks)


def test_real_classifier_splits_into_residual_blocks_and_runs_batched(assets):
    """PP-OCR cls (MobileNetV3 with SE blocks, a Reshape to a batch of 1 before its head): blocks between the
    inverted-residual blocks, the samples stacked into one batch (the Reshape keeps the batch)."""
    from real_models import load_canonical
    module, ctx = load_canonical(assets, "cls")
    manager = PassManager(parse_pipeline("fold-bn,fuse-hardswish,replace-se,calibrate{method=minmax},"
                                         "brecq{iterations=3 samples=2 batch=2}"), quiet=True)
    manager.run(module, ctx)
    record = manager.records[-1]
    assert record.stats["layers"] >= 40 and record.stats["blocks"] >= 10, record.stats
    assert record.stats["batched"] == 1


def test_learned_activation_scales_keep_their_zero_points_and_lower_the_block_error():
    samples = sample_inputs(conv_and_matmul(), PassContext(seed=3), 16)
    module = calibrated(samples)
    propagated = module.clone()  # brecq learns the encodings propagate-encodings will have given them (c takes r's)
    PropagateEncodings().run(propagated, PassContext(**QUIET))
    before = propagated.encodings
    result, _ = run_brecq(module, samples, drop=0.0, learn_scales=True, scale_lr=0.01)
    assert result.stats["scales-learned"] > 0 and result.stats["error-ratio-mean"] < 1.0
    changed = [name for name in ("x", "c", "r", "y") if module.encodings[name].scale != before[name].scale]
    assert changed
    for name in changed:
        assert module.encodings[name].offset == before[name].offset  # the zero point stays: float 0 exact
    without, _ = run_brecq(calibrated(samples), samples, drop=0.0)
    assert "scales-learned" not in without.stats
