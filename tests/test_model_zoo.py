"""The synthetic model zoo (tests/model_zoo.py) through qcc: ResNet, EfficientNet MBConv, a YOLO head,
transformer blocks, an NHWC input, style-transfer forms (InstanceNormalization, SAME_UPPER, Resize to sizes) and a
dynamic model, at opsets 7 to 17.

Per model: `qcc compile --target htp` (W8A8) exits 0, the QDQ model runs in onnxruntime with every
computing node reading quantized tensors and its outputs close to float (cosine > 0.98 on held-out
random samples), the passes whose pattern the model contains apply, and the float rewrites pass
--verify. On the QNN HTP backend (when onnxruntime-qnn is installed) the models run as a whole graph;
transformers with an Erf-Gelu only once fuse-gelu made it one Gelu op (HTP has no Erf). Masked attention
(two inputs, shape-computed reshapes) shows where W8A8 falls short and --target-cos recovers it.
"""
import importlib.util
import json

import numpy as np
import onnx
import pytest

from compiler.cli import main
from compiler.runtime import make_session
from compiler.targets import TARGETS
from compiler.qdq import PARAMETER_INPUTS
from model_zoo import ZooModel, dynamic_convnet, initializers_as_inputs, masked_attention, masked_attention_samples, \
    mbconv_se, nhwc_convnet, resnet_block, transformer_block, write_samples, yolo_head, zoo

FLOAT_REWRITES = ("fold-constants,cleanup,upgrade-opset{version=14},fold-bn,fuse-hardswish,fold-affine,replace-se,cle,"
                  "pad-channels{multiple=32}")
MODELS = {z.name: z for z in zoo() + [resnet_block(7), mbconv_se(17), yolo_head(10), yolo_head(13), yolo_head(17),
                                      transformer_block(11), transformer_block(13, contrib_gelu=True), nhwc_convnet(9),
                                      initializers_as_inputs(resnet_block(9))]}
# (pass, stat) that must be positive: the model contains the pattern the pass rewrites.
APPLIES = {
    "resnet_block": [("fold-bn", "bn-folded"), ("cle", "pairs-equalized")],
    "mbconv_se": [("fold-bn", "bn-folded"), ("replace-se", "se-rewritten")],
    "yolo_head": [("cle", "pairs-equalized")],
    "nhwc": [("cle", "pairs-equalized")],
    "dynamic": [("fold-bn", "bn-folded")],
    "style": [],
    "transformer": [],
    "transformer_contrib_gelu": [],
}
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def family(model: ZooModel) -> str:
    return model.name.rsplit("_op", 1)[0]  # resnet_block_op9_ir3 -> resnet_block


def htp_refuses_erf(model: ZooModel) -> bool:
    """QNN's execution provider has no Erf kernel: an Erf-Gelu runs on HTP once fuse-gelu made it one Gelu op."""
    return family(model) == "transformer" and TARGETS["htp"].build().find("fuse-gelu") is None


def shape_flags(model: ZooModel) -> list:
    return [arg for shape in model.input_shapes for arg in ("--input-shape", shape)]


@pytest.fixture(scope="module", params=sorted(MODELS))
def compiled(request, tmp_path_factory):
    """(zoo model, its folder, the W8A8 QDQ model's path), compiled once per model."""
    model = MODELS[request.param]
    folder = tmp_path_factory.mktemp(model.name)
    onnx.save(model.model, folder / "model.onnx")
    calib = write_samples(folder / "calib", model.sample_shape, count=4, seed=0)
    write_samples(folder / "eval", model.sample_shape, count=2, seed=1)
    out = folder / "w8a8.onnx"
    code = main(["compile", str(folder / "model.onnx"), "--target", "htp", "--calib-data", str(calib), "-o", str(out),
                 "-q", *shape_flags(model)])
    assert code == 0
    return model, folder, out


def held_out(folder):
    return [np.load(path) for path in sorted((folder / "eval").iterdir())]


def cosine(a, b) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_qdq_model_runs_in_onnxruntime_close_to_float(compiled):
    model, folder, out = compiled
    reference, quantized = make_session(model.model), make_session(onnx.load(out))
    name = reference.get_inputs()[0].name
    for x in held_out(folder):
        for want, got in zip(reference.run(None, {name: x}), quantized.run(None, {name: x})):
            assert cosine(want, got) > 0.98


def test_every_computing_node_reads_quantized_tensors(compiled):
    """A float tensor between two quantized ops leaves HTP a float op it cannot run."""
    _, _, out = compiled
    graph = onnx.load(out).graph
    producer = {name: node for node in graph.node for name in node.output}
    unquantized = []
    for node in graph.node:
        if node.op_type in QDQ_OPS + ("Constant",):
            continue
        for index, name in enumerate(node.input):
            if not name or index in PARAMETER_INPUTS.get(node.op_type, ()):  # shapes, Clip bounds, pad values
                continue
            source = producer.get(name)
            if source is None or source.op_type != "DequantizeLinear":
                unquantized.append(f"{node.op_type} {node.name} input {name}")
    assert not unquantized


def test_rewrites_apply_where_the_pattern_is(compiled):
    model, _, out = compiled
    report = json.loads(out.with_name(out.stem + ".report.json").read_text())
    stats = {p["name"]: p["stats"] for p in report["passes"]}
    for pass_name, stat in APPLIES[family(model)]:
        assert stats[pass_name][stat] > 0, (pass_name, stats[pass_name])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_float_rewrites_verify(name, tmp_path):
    model = MODELS[name]
    onnx.save(model.model, tmp_path / "model.onnx")
    code = main(["compile", str(tmp_path / "model.onnx"), "--passes", FLOAT_REWRITES, "--verify", "-o",
                 str(tmp_path / "out.onnx"), "-q", *shape_flags(model)])
    assert code == 0


def test_dynamic_model_without_input_shape_is_a_one_line_error(tmp_path, capsys):
    model = dynamic_convnet()
    onnx.save(model.model, tmp_path / "model.onnx")
    code = main(["compile", str(tmp_path / "model.onnx"), "--passes", FLOAT_REWRITES, "--verify", "-o",
                 str(tmp_path / "out.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and "--input-shape x:" in err and "Traceback" not in err


def assert_runs_on_htp(path, feed: dict) -> None:
    """The whole QDQ model runs on QNN's HTP backend of the generation it was compiled for (the default, v73: its
    16-bit layers hold 16-bit weights, which v68 refuses), its outputs close to the CPU simulation's."""
    from compiler.config import DEFAULT_HTP_ARCH
    from compiler.htp import htp_session
    proto = onnx.load(path)
    session = htp_session(proto, {"htp_arch": DEFAULT_HTP_ARCH})
    for want, got in zip(make_session(proto).run(None, feed), session.run(None, feed)):
        assert cosine(want, got) > 0.99


def test_runs_on_htp(compiled):
    pytest.importorskip("onnxruntime_qnn")
    from compiler.htp import htp_session
    from compiler.ir import QccError
    model, folder, out = compiled
    if htp_refuses_erf(model):
        with pytest.raises(QccError, match="Erf"):
            htp_session(onnx.load(out))
    else:
        assert_runs_on_htp(out, {model.model.graph.input[0].name: held_out(folder)[0]})


@pytest.mark.parametrize("opset", [11, 13, 17])
def test_transformer_with_fuse_gelu_runs_on_htp(opset, tmp_path):
    pytest.importorskip("onnxruntime_qnn")
    model = transformer_block(opset)
    onnx.save(model.model, tmp_path / "model.onnx")
    calib = write_samples(tmp_path / "calib", model.sample_shape, count=4, seed=0)
    pipeline = str(TARGETS["htp"].build())
    if "fuse-gelu" not in pipeline:  # before fold-affine, which folds Gelu's 0.5 into the next MatMul
        pipeline = pipeline.replace("fold-bn,", "fuse-gelu,fold-bn,")
    out = tmp_path / "w8a8.onnx"
    assert main(["compile", str(tmp_path / "model.onnx"), "--passes", pipeline, "--calib-data", str(calib),
                 "-o", str(out), "-q"]) == 0
    assert "Erf" not in {node.op_type for node in onnx.load(out).graph.node}
    assert_runs_on_htp(out, {"x": np.random.default_rng(1).standard_normal(model.sample_shape).astype(np.float32)})


def test_masked_attention_needs_16_bit_scores_and_gets_them(tmp_path):
    """The additive mask (-1e4) stretches the masked scores' 8-bit range until the unmasked scores round to a few
    steps: W8A8 loses accuracy there (cosine ~0.97 on random data). --target-cos promotes that tensor to 16 bits."""
    model = masked_attention()
    onnx.save(model.model, tmp_path / "model.onnx")
    calib = masked_attention_samples(tmp_path / "calib", count=4, seed=0)
    samples = [dict(np.load(path)) for path in sorted(masked_attention_samples(tmp_path / "eval", 2, seed=1).iterdir())]
    reference = make_session(model.model)
    cosines = {}
    for name, flags in (("w8a8", []), ("mixed", ["--target-cos", "0.999"])):
        out = tmp_path / f"{name}.onnx"
        assert main(["compile", str(tmp_path / "model.onnx"), "--target", "htp", "--calib-data", str(calib), "-o", str(out),
                     "-q", *shape_flags(model), *flags]) == 0
        quantized = make_session(onnx.load(out))
        cosines[name] = min(cosine(reference.run(None, s)[0], quantized.run(None, s)[0]) for s in samples)
    assert cosines["w8a8"] < 0.99 < cosines["mixed"], cosines
    if importlib.util.find_spec("onnxruntime_qnn"):
        assert_runs_on_htp(tmp_path / "mixed.onnx", samples[0])  # 8/16-bit converts included
