"""The real PP-OCR classifier through the htp target at W8A8, checked against FP32 on held-out text images.

Measured with tools/bench.py (calibrate on 32, evaluate on 32 held-out text images, two folds): mean cosine 0.9978 / 0.9984.
With 12 calibration images, as here, the threshold leaves a wide margin (0.99).
"""
import numpy as np
import onnxruntime as ort

from compiler.data import Dataset, ImageOptions, specs_of
from compiler.ir import load
from compiler.quantize import compile_model

IMAGE = ImageOptions(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def _data(assets, module):
    folder = assets / "text_cls" if (assets / "text_cls").is_dir() else assets / "images"
    calib, held = Dataset(folder, specs_of(module), image=IMAGE, count=24).split(0.5)
    return calib, held


def test_cls_w8a8_close_to_fp32_on_held_out_images(assets):
    module = load(assets / "models" / "ppocr_cls.onnx", {"x": [1, 3, 48, 192]})
    calib, held = _data(assets, module)
    result = compile_model(module, "htp", calib_data=calib, eval_data=held)
    (name, metrics), = result.metrics.items()
    assert metrics["samples"] == len(held) == 12
    assert metrics["cosine_mean"] > 0.99, metrics
    assert metrics["sqnr_db"] > 15, metrics
    quantized = module.to_onnx()
    ops = {n.op_type for n in quantized.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "HardSwish"} <= ops and "BatchNormalization" not in ops
    # Every float tensor a compute op reads is dequantized: the whole graph runs quantized.
    producers = {out: n.op_type for n in quantized.graph.node for out in n.output}
    params = {"Clip": {1, 2}, "Reshape": {1}, "Resize": {1, 2, 3}}
    for node in quantized.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for i, tensor in enumerate(node.input):
            if tensor and i not in params.get(node.op_type, ()) and tensor in producers:
                assert producers[tensor] == "DequantizeLinear", f"{node.op_type} reads {tensor} unquantized"
    # onnxruntime CPU runs it with graph optimisations disabled (exact QDQ simulation) and enabled.
    sample = held[0]
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        session = ort.InferenceSession(quantized.SerializeToString(), options, providers=["CPUExecutionProvider"])
        assert np.isfinite(session.run(None, sample)[0]).all()
