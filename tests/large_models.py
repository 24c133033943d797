"""Large synthetic models for scaling checks (seeded random weights, no downloads).

``conv_relu_chain(depth)``: ``depth`` Conv+Relu pairs in a row, every adjacent pair equalizable by cle.
``mixed_blocks(blocks)``: residual blocks of Conv/Relu/Add/Mul/Concat/Sigmoid, ten nodes each
(``mixed_blocks(500)`` has 5,000 nodes), the shape of a deep backbone without its size.

Run as a script to write them for the command line:
``python3 -m tests.large_models OUT_DIR`` writes chain_{250,500,1000,2500}.onnx, mixed_5000.onnx and a
calibration folder calib/ of four .npy samples for the mixed model.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from tests.model_zoo import GraphBuilder

SPATIAL = 8


def _model(builder: GraphBuilder, name: str, x: str, y: str, channels: int) -> onnx.ModelProto:
    shape = [1, channels, SPATIAL, SPATIAL]
    graph = helper.make_graph(builder.nodes, name, [helper.make_tensor_value_info(x, TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, shape)], builder.initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def conv_relu_chain(depth: int, channels: int = 8, seed: int = 0) -> onnx.ModelProto:
    """``depth`` times Conv(3x3, ``channels`` -> ``channels``, bias) + Relu on a [1, channels, 8, 8] input."""
    builder = GraphBuilder(seed)
    y = "x"
    for _ in range(depth):
        y = builder.op("Relu", builder.conv(y, channels, channels))
    return _model(builder, f"conv_relu_chain_{depth}", "x", y, channels)


def mixed_blocks(blocks: int, channels: int = 8, seed: int = 0) -> onnx.ModelProto:
    """``blocks`` residual blocks of ten nodes on a [1, channels, 8, 8] input:

        a = Relu(Conv3x3(x)); b = Relu(Conv1x1(a)); s = Add(b, x); m = Mul(s, per-channel c)
        p = Conv1x1(m, half); q = Sigmoid(Conv1x1(m, half)); x' = Concat(p, q)
    """
    builder = GraphBuilder(seed)
    half = channels // 2
    x = "x"
    for _ in range(blocks):
        a = builder.op("Relu", builder.conv(x, channels, channels))
        b = builder.op("Relu", builder.conv(a, channels, channels, k=1))
        s = builder.op("Add", b, x)
        m = builder.op("Mul", s, builder.const(builder.rng.uniform(0.5, 1.5, (1, channels, 1, 1)), "scale"))
        p = builder.conv(m, channels, half, k=1)
        q = builder.op("Sigmoid", builder.conv(m, channels, half, k=1))
        x = builder.op("Concat", p, q, axis=1)
    return _model(builder, f"mixed_blocks_{blocks}", "x", x, channels)


def write_calibration(folder: Path, channels: int = 8, count: int = 4, seed: int = 0) -> None:
    """``count`` .npy samples of shape [1, channels, 8, 8] (compiler/data.py's folder format)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        np.save(folder / f"sample_{i:02d}.npy", rng.standard_normal((1, channels, SPATIAL, SPATIAL)).astype(np.float32))


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for depth in (250, 500, 1000, 2500):
        onnx.save(conv_relu_chain(depth), out / f"chain_{depth}.onnx")
    onnx.save(mixed_blocks(500), out / "mixed_5000.onnx")
    write_calibration(out / "calib")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
