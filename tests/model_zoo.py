"""Small synthetic models in the shapes of public architectures (seeded random weights, no downloads).

Each builder returns a ``ZooModel``: the ONNX model, the shape of its calibration samples and the
``--input-shape`` flags a dynamic model needs. They cover what real exports contain beyond PP-OCR:
old opsets, BatchNormalization with old attributes, Swish and SE gates, YOLO detection heads (Resize,
Split, Slice, Reshape/Transpose of the output), transformer blocks (MatMul of two activations,
Softmax, LayerNormalization as an op or decomposed, Erf-Gelu), NHWC inputs and dynamic dimensions.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


@dataclass
class ZooModel:
    name: str
    model: onnx.ModelProto
    sample_shape: tuple
    input_shapes: list = field(default_factory=list)  # --input-shape values


class GraphBuilder:
    """Nodes and seeded initializers, with generated tensor names: ``b.op("Conv", x, w)`` returns the output name."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list = []
        self.initializers: list = []
        self.count = 0

    def _name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, values, hint: str = "c") -> str:
        name = self._name(hint)
        array = np.asarray(values)
        array = array.astype(np.float32) if array.dtype.kind == "f" else array
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def weight(self, *shape, scale: float | None = None, hint: str = "w") -> str:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
        scale = scale if scale is not None else 1.0 / np.sqrt(fan_in)
        return self.const(self.rng.standard_normal(shape) * scale, hint)

    def op(self, op_type: str, *inputs: str, outputs: int = 1, **attrs):
        names = [self._name(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=names[0], **attrs))
        return names[0] if outputs == 1 else names

    def conv(self, x: str, cin: int, cout: int, k: int = 3, stride: int = 1, group: int = 1, bias: bool = True) -> str:
        inputs = [x, self.weight(cout, cin // group, k, k)]
        if bias:
            inputs.append(self.const(self.rng.standard_normal(cout) * 0.1, "b"))
        return self.op("Conv", *inputs, kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4, group=group)

    def bn(self, x: str, channels: int, **attrs) -> str:
        rng = self.rng
        return self.op("BatchNormalization", x, self.const(rng.uniform(0.5, 1.5, channels), "gamma"),
                       self.const(rng.standard_normal(channels) * 0.1, "beta"),
                       self.const(rng.standard_normal(channels) * 0.1, "mean"),
                       self.const(rng.uniform(0.5, 1.5, channels), "var"), epsilon=1e-5, **attrs)

    def swish(self, x: str) -> str:
        return self.op("Mul", x, self.op("Sigmoid", x))

    def model(self, inputs: list, outputs: list, opset: int, name: str, contrib: bool = False) -> onnx.ModelProto:
        """``contrib``: the graph uses onnxruntime's com.microsoft ops."""
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.initializers)
        imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid("com.microsoft", 1)] if contrib else [])
        model = helper.make_model(graph, opset_imports=imports, producer_name="qcc-zoo")
        model.ir_version = 7 if opset < 15 else 8
        onnx.checker.check_model(model)
        return model


def _input(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _output(name: str, shape=None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def resnet_block(opset: int = 9) -> ZooModel:
    """ResNet stem + two basic blocks (the second strided, with a 1x1 downsample), GAP, Flatten, Gemm."""
    b = GraphBuilder(seed=1)
    bn_attrs = {"momentum": 0.9, **({"spatial": 1} if opset < 9 else {})}
    x = b.op("Relu", b.bn(b.conv("x", 3, 16, bias=False), 16, **bn_attrs))
    x = b.op("MaxPool", x, kernel_shape=[2, 2], strides=[2, 2])
    for stride, cin, cout in ((1, 16, 16), (2, 16, 32)):
        y = b.op("Relu", b.bn(b.conv(x, cin, cout, stride=stride, bias=False), cout, **bn_attrs))
        y = b.bn(b.conv(y, cout, cout, bias=False), cout, **bn_attrs)
        shortcut = x if stride == 1 else b.bn(b.conv(x, cin, cout, k=1, stride=stride, bias=False), cout, **bn_attrs)
        x = b.op("Relu", b.op("Add", y, shortcut))
    x = b.op("Flatten", b.op("GlobalAveragePool", x), axis=1)
    b.nodes.append(helper.make_node("Gemm", [x, b.weight(10, 32), b.const(b.rng.standard_normal(10) * 0.1)], ["logits"],
                                    name="fc", transB=1))
    model = b.model([_input("x", [1, 3, 32, 32])], [_output("logits", [1, 10])], opset, "resnet_block")
    return ZooModel(f"resnet_block_op{opset}", model, (1, 3, 32, 32))


def mbconv_se(opset: int = 11) -> ZooModel:
    """EfficientNet MBConv: 1x1 expand + BN + Swish, depthwise 3x3 + BN + Swish, SE (GAP, 1x1 conv, Swish,
    1x1 conv, Sigmoid gate, Mul), 1x1 project + BN, residual Add; then a 1x1 head, GAP, Flatten, Gemm."""
    b = GraphBuilder(seed=2)
    stem = b.swish(b.bn(b.conv("x", 3, 16, stride=2, bias=False), 16))
    e = b.swish(b.bn(b.conv(stem, 16, 64, k=1, bias=False), 64))
    d = b.swish(b.bn(b.conv(e, 64, 64, group=64, bias=False), 64))
    s = b.swish(b.conv(b.op("GlobalAveragePool", d), 64, 4, k=1))
    gate = b.op("Sigmoid", b.conv(s, 4, 64, k=1))
    p = b.bn(b.conv(b.op("Mul", d, gate), 64, 16, k=1, bias=False), 16)
    x = b.op("Add", p, stem)
    h = b.swish(b.bn(b.conv(x, 16, 32, k=1, bias=False), 32))
    f = b.op("Flatten", b.op("GlobalAveragePool", h), axis=1)
    b.nodes.append(helper.make_node("Gemm", [f, b.weight(10, 32), b.const(np.zeros(10))], ["logits"], name="fc", transB=1))
    model = b.model([_input("x", [1, 3, 32, 32])], [_output("logits", [1, 10])], opset, "mbconv_se")
    return ZooModel(f"mbconv_se_op{opset}", model, (1, 3, 32, 32))


def yolo_head(opset: int = 12) -> ZooModel:
    """YOLOv5-like: LeakyRelu and SiLU convs, nearest Resize x2, Concat, Split (C2f-style), a detect head
    reshaped to (1, anchors, H, W, 5 + classes) and transposed, Sigmoid, box decode with Slice,
    Mul/Add/Pow by constants and a grid, Concat and Reshape to (1, N, 5 + classes)."""
    anchors, classes, grid = 3, 2, 8
    no = 5 + classes
    b = GraphBuilder(seed=3)
    c1 = b.op("LeakyRelu", b.conv("x", 3, 16, stride=2), alpha=0.1)               # 16x16
    c2 = b.swish(b.conv(c1, 16, 32, stride=2))                                     # 8x8
    c3 = b.swish(b.conv(c2, 32, 32, stride=2))                                     # 4x4
    roi = [] if opset < 11 else ["" if opset >= 13 else b.const(np.zeros(0), "roi")]
    up = b.op("Resize", b.conv(c3, 32, 16, k=1), *roi, b.const([1.0, 1.0, 2.0, 2.0], "scales"), mode="nearest")
    cat = b.op("Concat", up, c2, axis=1)                                           # 48ch 8x8
    halves = b.conv(cat, 48, 32, k=1)
    if opset < 13:
        left, right = b.op("Split", halves, outputs=2, axis=1, split=[16, 16])
    else:
        left, right = b.op("Split", halves, b.const(np.array([16, 16], np.int64)), outputs=2, axis=1)
    right = b.swish(b.conv(right, 16, 16))
    merged = b.swish(b.conv(b.op("Concat", left, right, axis=1), 32, 32, k=1))
    head = b.conv(merged, 32, anchors * no, k=1)
    head = b.op("Reshape", head, b.const(np.array([1, anchors, no, grid, grid], np.int64), "shape"))
    y = b.op("Sigmoid", b.op("Transpose", head, perm=[0, 1, 3, 4, 2]))              # 1,3,8,8,7

    def part(start, end):
        return b.op("Slice", y, b.const(np.array([start], np.int64)), b.const(np.array([end], np.int64)),
                    b.const(np.array([4], np.int64)))

    gy, gx = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    offsets = np.stack([gx, gy], -1).reshape(1, 1, grid, grid, 2) - 0.5
    xy = b.op("Mul", b.op("Add", b.op("Mul", part(0, 2), b.const(2.0)), b.const(offsets, "grid")), b.const(4.0, "stride"))
    anchor_wh = b.rng.uniform(4, 16, (1, anchors, 1, 1, 2))
    wh = b.op("Mul", b.op("Pow", b.op("Mul", part(2, 4), b.const(2.0)), b.const(2.0)), b.const(anchor_wh, "anchors"))
    boxes = b.op("Concat", xy, wh, part(4, no), axis=4)
    b.nodes.append(helper.make_node("Reshape", [boxes, b.const(np.array([1, -1, no], np.int64))], ["detections"],
                                    name="flatten_detections"))
    model = b.model([_input("x", [1, 3, 32, 32])], [_output("detections", [1, anchors * grid * grid, no])], opset, "yolo")
    return ZooModel(f"yolo_head_op{opset}", model, (1, 3, 32, 32))


def _layer_norm(b: GraphBuilder, x: str, width: int, opset: int) -> str:
    gamma, beta = b.const(b.rng.uniform(0.5, 1.5, width), "ln_gamma"), b.const(b.rng.standard_normal(width) * 0.1, "ln_beta")
    if opset >= 17:
        return b.op("LayerNormalization", x, gamma, beta, axis=-1, epsilon=1e-5)
    centred = b.op("Sub", x, b.op("ReduceMean", x, axes=[-1]))
    variance = b.op("ReduceMean", b.op("Pow", centred, b.const(2.0)), axes=[-1])
    normed = b.op("Div", centred, b.op("Sqrt", b.op("Add", variance, b.const(1e-5))))
    return b.op("Add", b.op("Mul", normed, gamma), beta)


def transformer_block(opset: int = 13, seq: int = 8, width: int = 32, heads: int = 4, contrib_gelu: bool = False) -> ZooModel:
    """Pre-norm encoder block: LayerNorm, Q/K/V MatMul + bias, Reshape/Transpose into heads, Q.K^T MatMul,
    scale, Softmax, .V MatMul, heads merged, output projection, residual; LayerNorm, MLP with Erf-Gelu,
    residual. LayerNormalization is an op at opset 17, decomposed (ReduceMean/Sub/Pow/Sqrt/Div) below.
    ``contrib_gelu``: onnxruntime's com.microsoft Gelu instead of Erf-Gelu (its transformer optimizer writes it)."""
    b = GraphBuilder(seed=4 + opset)
    head = width // heads

    def linear(x, cin, cout):
        return b.op("Add", b.op("MatMul", x, b.weight(cin, cout, scale=1 / np.sqrt(cin))), b.const(b.rng.standard_normal(cout) * 0.1))

    def split_heads(t, perm):
        return b.op("Transpose", b.op("Reshape", t, b.const(np.array([1, seq, heads, head], np.int64))), perm=perm)

    n = _layer_norm(b, "x", width, opset)
    q = split_heads(linear(n, width, width), [0, 2, 1, 3])
    k = split_heads(linear(n, width, width), [0, 2, 3, 1])
    v = split_heads(linear(n, width, width), [0, 2, 1, 3])
    scores = b.op("Div", b.op("MatMul", q, k), b.const(np.sqrt(head)))
    attention = b.op("MatMul", b.op("Softmax", scores, axis=-1), v)
    merged = b.op("Reshape", b.op("Transpose", attention, perm=[0, 2, 1, 3]), b.const(np.array([1, seq, width], np.int64)))
    x = b.op("Add", "x", linear(merged, width, width))
    h = linear(_layer_norm(b, x, width, opset), width, 2 * width)
    if contrib_gelu:
        gelu = b.op("Gelu", h, domain="com.microsoft")
    else:
        gelu = b.op("Mul", b.op("Mul", h, b.op("Add", b.op("Erf", b.op("Div", h, b.const(np.sqrt(2.0)))), b.const(1.0))),
                    b.const(0.5))
    out = linear(gelu, 2 * width, width)
    b.nodes.append(helper.make_node("Add", [x, out], ["y"], name="residual_out"))
    model = b.model([_input("x", [1, seq, width])], [_output("y", [1, seq, width])], opset, "transformer",
                    contrib=contrib_gelu)
    return ZooModel(f"transformer{'_contrib_gelu' if contrib_gelu else ''}_op{opset}", model, (1, seq, width))


def masked_attention(opset: int = 13, width: int = 32, heads: int = 4) -> ZooModel:
    """Self-attention as HuggingFace exports it: dynamic batch and sequence, the head reshapes' targets computed
    with Shape/Gather/Unsqueeze/Concat, and a second input, the additive attention mask (0 or -1e4) on the scores.
    Compiled with --input-shape x:1,8,32 --input-shape mask:1,1,8,8 and .npz samples (``masked_attention_samples``)."""
    b = GraphBuilder(seed=8)
    head = width // heads
    shape = b.op("Shape", "x")
    dims = [b.op("Unsqueeze", b.op("Gather", shape, b.const(np.array(i, np.int64)), axis=0), b.const(np.array([0], np.int64)))
            for i in (0, 1)]
    split_shape = b.op("Concat", *dims, b.const(np.array([heads, head], np.int64)), axis=0)
    merged_shape = b.op("Concat", *dims, b.const(np.array([width], np.int64)), axis=0)

    def linear(x):
        return b.op("Add", b.op("MatMul", x, b.weight(width, width)), b.const(b.rng.standard_normal(width) * 0.1))

    def split_heads(t, perm):
        return b.op("Transpose", b.op("Reshape", t, split_shape), perm=perm)

    q, k, v = split_heads(linear("x"), [0, 2, 1, 3]), split_heads(linear("x"), [0, 2, 3, 1]), split_heads(linear("x"), [0, 2, 1, 3])
    scores = b.op("Add", b.op("Mul", b.op("MatMul", q, k), b.const(1 / np.sqrt(head))), "mask")
    attention = b.op("MatMul", b.op("Softmax", scores, axis=-1), v)
    merged = b.op("Reshape", b.op("Transpose", attention, perm=[0, 2, 1, 3]), merged_shape)
    b.nodes.append(helper.make_node("Add", ["x", linear(merged)], ["y"], name="residual"))
    model = b.model([_input("x", ["B", "S", width]), _input("mask", ["B", 1, "S", "S"])], [_output("y", ["B", "S", width])],
                    opset, "masked_attention")
    return ZooModel(f"masked_attention_op{opset}", model, (1, 8, width), input_shapes=["x:1,8,32", "mask:1,1,8,8"])


def masked_attention_samples(folder, count: int = 4, seed: int = 0, seq: int = 8, width: int = 32):
    """.npz samples for ``masked_attention``: random x and a causal mask (0 on and below the diagonal, -1e4 above)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    mask = np.where(np.tril(np.ones((seq, seq))) > 0, 0.0, -1e4).reshape(1, 1, seq, seq).astype(np.float32)
    for i in range(count):
        np.savez(folder / f"{i:03d}.npz", x=rng.standard_normal((1, seq, width)).astype(np.float32), mask=mask)
    return folder


def nhwc_convnet(opset: int = 13) -> ZooModel:
    """An NHWC input (TensorFlow export): Transpose to NCHW, Conv/Relu, depthwise Conv/Relu6 (Clip), Conv,
    Transpose back to NHWC."""
    b = GraphBuilder(seed=5)
    x = b.op("Transpose", "x", perm=[0, 3, 1, 2])
    x = b.op("Relu", b.conv(x, 3, 16))
    depthwise = b.conv(x, 16, 16, group=16)
    if opset < 11:
        x = b.op("Clip", depthwise, min=0.0, max=6.0)
    else:
        x = b.op("Clip", depthwise, b.const(0.0), b.const(6.0))
    x = b.conv(x, 16, 8, k=1)
    b.nodes.append(helper.make_node("Transpose", [x], ["y"], name="to_nhwc", perm=[0, 2, 3, 1]))
    model = b.model([_input("x", [1, 16, 16, 3])], [_output("y", [1, 16, 16, 8])], opset, "nhwc")
    return ZooModel(f"nhwc_op{opset}", model, (1, 16, 16, 3))


def style_convnet(opset: int = 13) -> ZooModel:
    """Style-transfer / TF-export forms: Conv with auto_pad=SAME_UPPER, a dilated Conv, Pad with its pads as an
    input, InstanceNormalization, Resize to 'sizes' (linear, align_corners), ConvTranspose with output_padding."""
    b = GraphBuilder(seed=7)
    x = b.op("Conv", "x", b.weight(8, 3, 3, 3), b.const(np.zeros(8)), kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER")
    x = b.op("Relu", b.op("InstanceNormalization", x, b.const(b.rng.uniform(0.5, 2, 8)), b.const(b.rng.standard_normal(8))))
    x = b.op("Conv", x, b.weight(8, 8, 3, 3), kernel_shape=[3, 3], dilations=[2, 2], pads=[2, 2, 2, 2])
    x = b.op("Pad", x, b.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)), b.const(np.array(0.0)), mode="constant")
    x = b.op("Resize", x, "", "", b.const(np.array([1, 8, 20, 20], np.int64)), mode="linear",
             coordinate_transformation_mode="align_corners")
    b.nodes.append(helper.make_node("ConvTranspose", [x, b.weight(8, 3, 3, 3), b.const(np.zeros(3))], ["y"], name="deconv",
                                    kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1]))
    model = b.model([_input("x", [1, 3, 20, 20])], [_output("y", [1, 3, 40, 40])], opset, "style")
    return ZooModel(f"style_op{opset}", model, (1, 3, 20, 20))


def dynamic_convnet(opset: int = 13) -> ZooModel:
    """Dynamic batch, height and width ('N', 3, 'H', 'W'): compiled with --input-shape x:1,3,24,24."""
    b = GraphBuilder(seed=6)
    x = b.op("Relu", b.bn(b.conv("x", 3, 16, stride=2, bias=False), 16))
    x = b.op("Relu", b.conv(x, 16, 16))
    x = b.op("Flatten", b.op("GlobalAveragePool", x), axis=1)
    b.nodes.append(helper.make_node("Gemm", [x, b.weight(5, 16), b.const(np.zeros(5))], ["logits"], name="fc", transB=1))
    model = b.model([_input("x", ["N", 3, "H", "W"])], [_output("logits", ["N", 5])], opset, "dynamic")
    return ZooModel(f"dynamic_op{opset}", model, (1, 3, 24, 24), input_shapes=["x:1,3,24,24"])


def initializers_as_inputs(model: ZooModel) -> ZooModel:
    """``model`` as IR version 3 writes it (old exporters, PyTorch's keep_initializers_as_inputs): every
    initializer listed among the graph inputs too."""
    proto = onnx.ModelProto.FromString(model.model.SerializeToString())
    proto.ir_version = 3
    proto.graph.input.extend(helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in proto.graph.initializer)
    return ZooModel(f"{model.name}_ir3", proto, model.sample_shape, model.input_shapes)


def zoo() -> list[ZooModel]:
    return [resnet_block(9), mbconv_se(11), yolo_head(12), transformer_block(13), transformer_block(17),
            nhwc_convnet(13), style_convnet(13), dynamic_convnet(13)]


def write_samples(folder, shape, count: int = 4, seed: int = 0):
    """``count`` seeded standard-normal .npy samples of ``shape`` in ``folder`` (created)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        np.save(folder / f"{i:03d}.npy", rng.standard_normal(shape).astype(np.float32))
    return folder
