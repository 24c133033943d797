"""Bias correction: quantized-weight outputs keep the FP32 per-channel means; analytic matches empirical."""
import numpy as np
import onnx.parser

from compiler.config import QuantConfig
from compiler.encoding import fake_quantize, weight_encoding
from tests.golden_cases import GOLDEN_ROOT, GoldenCase
from compiler.ir import const_value, from_onnx, infer_shapes, load
from compiler.linear import linear_layer, set_input_const
from compiler.pass_manager import PassContext, PassManager, parse_pipeline
from compiler.runtime import run_model, sample_inputs
from passes.bias_correction import MARK, BiasCorrection, _output_layers, _shrunk_mean


def golden(case):
    return GoldenCase(GOLDEN_ROOT / "bias-correction" / case).load_input()


def correct(module, ctx, weight_bits=8, **options):
    """The pass at ``weight_bits``; these small graphs' layers are their output layers, which only
    output-layers=true corrects."""
    ctx.config = QuantConfig(weight_bits=weight_bits)
    return BiasCorrection(BiasCorrection.Options(**{"output_layers": True, **options})).run(module, ctx)


def quantize_weights(module, bits, per_channel=True):
    """Replace every layer weight by its fake-quantized value, as the QDQ model will see it."""
    quantized = module.clone()
    for node in quantized.graph.nodes:
        layer, _ = linear_layer(node)
        if layer is not None:
            set_input_const(quantized.graph, node, 1, fake_quantize(layer.weight, layer.encoding(quantized, bits, per_channel)))
    return quantized


def channel_means(module, samples, name):
    outs = run_model(module, samples, [name])
    return np.mean([o[name].mean(axis=(0, 2, 3)) for o in outs], axis=0)


def test_empirical_restores_per_channel_means():
    module = golden("conv_empirical")
    ctx = PassContext(calib_data=sample_inputs(module, PassContext(seed=1), 6), log=lambda m: None)
    float_means = channel_means(module, ctx.calib_data, "c")
    before = np.abs(channel_means(quantize_weights(module, 4), ctx.calib_data, "c") - float_means)
    result = correct(module, ctx, weight_bits=4)
    after = np.abs(channel_means(quantize_weights(module, 4), ctx.calib_data, "c") - float_means)
    assert result.modified and result.stats["corrected"] == 1
    assert before.max() > 1e-3  # 4-bit rounding does shift the means
    np.testing.assert_allclose(after, 0.0, atol=1e-5)  # exact on the data it was measured on
    assert not correct(module, ctx, weight_bits=4).modified  # annotated: a second run changes nothing


def test_existing_weight_encoding_is_used():
    module = golden("conv_empirical")
    ctx = PassContext(calib_data=sample_inputs(module, PassContext(seed=1), 2), log=lambda m: None)
    conv = next(n for n in module.graph.nodes if n.op == "Conv")
    weight = const_value(conv.inputs[1])
    # A weight already on its grid (as AdaRound leaves it) has no rounding error left to correct.
    enc = weight_encoding(weight, 4, 0)
    set_input_const(module.graph, conv, 1, fake_quantize(weight, enc))
    module.encodings[conv.inputs[1].name] = enc
    result = correct(module, ctx, weight_bits=4)
    assert not result.modified and result.stats["corrected"] == 0


def test_analytic_agrees_with_empirical_on_gaussian_batchnorm_outputs():
    # x ~ N(0, 1) and BN statistics mean 0 var 1 make the BN output exactly N(beta, gamma^2).
    text = """<ir_version: 8, opset_import: ["" : 13]>
g (float[1,3,16,16] x) => (float[1,2,16,16] y)
  <float[3] g1 = {1.0, 0.5, 2.0}, float[3] b1 = {0.5, -0.2, 1.0}, float[3] m1 = {0.0, 0.0, 0.0},
   float[3] v1 = {0.99999, 0.99999, 0.99999},
   float[2,3,1,1] w = {0.91, -0.37, 0.55, -0.12, 0.74, 0.29}, float[2] b = {0.0, 0.0}> {
  n = BatchNormalization(x, g1, b1, m1, v1)
  r = Relu(n)
  y = Conv(r, w, b)
}
"""
    module = from_onnx(infer_shapes(onnx.parser.parse_model(text)))
    empirical, analytic = module.clone(), module.clone()
    ctx = PassContext(calib_data=sample_inputs(module, PassContext(seed=2), 16), log=lambda m: None)
    correct(empirical, ctx, weight_bits=4)
    assert correct(analytic, PassContext(log=lambda m: None), mode="analytic", weight_bits=4).modified
    bias = lambda m: const_value(next(n for n in m.graph.nodes if n.op == "Conv").inputs[2])
    np.testing.assert_allclose(bias(analytic), bias(empirical), rtol=0.05, atol=1e-4)
    assert np.abs(bias(analytic)).max() > 1e-3


def test_analytic_declines_without_statistics_and_empirical_without_data():
    module = golden("conv_empirical")
    analytic = PassContext(log=lambda m: None)
    assert not correct(module, analytic, mode="analytic").modified
    assert any("batch-norm statistics" in r.message for r in analytic.remarks)
    no_data = PassContext(log=lambda m: None)
    assert not correct(module, no_data).modified
    assert any("calibration data" in r.message for r in no_data.remarks)


def test_analytic_corrects_into_the_following_batchnorm():
    module = golden("analytic_bn")
    bn = [n for n in module.graph.nodes if n.op == "BatchNormalization"][1]
    beta = const_value(bn.inputs[2]).copy()
    ctx = PassContext(log=lambda m: None)
    result = correct(module, ctx, mode="analytic", weight_bits=4)
    assert result.stats["corrected"] == 1 and result.stats["declined"] == 1  # the first conv reads the graph input
    assert not np.allclose(const_value(bn.inputs[2]), beta)


def test_real_cls_model_weight_quantization_error_shrinks(assets):
    from compiler.data import Dataset, ImageOptions, specs_of
    module = load(assets / "models" / "ppocr_cls.onnx", {"x": [1, 3, 48, 192]})
    PassManager(parse_pipeline("fold-constants,cleanup"), quiet=True).run(module, PassContext())
    data = Dataset(assets / "text_cls", specs_of(module), count=24, image=ImageOptions(mean=(0.5,) * 3, std=(0.5,) * 3))
    calib, held = data.split(0.5)
    calib, held = list(calib), list(held)
    reference = run_model(module, held)

    def sqnr(candidate):
        got = run_model(quantize_weights(candidate, 4), held)
        key = next(iter(reference[0]))
        signal = sum(float(np.square(r[key].astype(np.float64)).sum()) for r in reference)
        noise = sum(float(np.square(r[key].astype(np.float64) - g[key]).sum()) for r, g in zip(reference, got))
        return 10 * np.log10(signal / noise)

    corrected = module.clone()
    result = correct(corrected, PassContext(calib_data=calib, log=lambda m: None), weight_bits=4)
    assert result.stats["corrected"] >= 50
    assert sqnr(corrected) > sqnr(module) + 1.0  # held-out images, 4-bit weights: about +2.5 dB measured


CHAIN = """<ir_version: 8, opset_import: ["" : 13]>
g (float[1,3,12,12] x) => (float[1,2,12,12] y)
  <float[4,3,3,3] w1 = {WEIGHTS1}, float[4] b1 = {0.4, -0.3, 0.1, 0.0},
   float[2,4,1,1] w2 = {0.9, -0.6, 0.3, 0.5, -0.2, 0.8, 0.7, -0.4}, float[2] b2 = {0.05, -0.1}> {
  c1 = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
  r = Relu(c1)
  c2 = Conv(r, w2, b2)
  y = Relu(c2)
}
"""


def chain_module():
    weights = np.random.default_rng(3).normal(0, 0.4, 108)
    text = CHAIN.replace("{WEIGHTS1}", "{" + ", ".join(f"{w:.4f}" for w in weights) + "}")
    return from_onnx(infer_shapes(onnx.parser.parse_model(text)))


def quantized_conv_means(module, samples):
    """Per-channel means of c1 and c2 in the QDQ model insert-qdq writes (conv outputs, before their quantizers)."""
    qdq = module.clone()
    PassManager(parse_pipeline("quant{weight-bits=4},propagate-encodings,insert-qdq"), quiet=True).run(qdq, PassContext())
    return [channel_means(qdq, samples, name) for name in ("c1", "c2")]


def test_sequential_restores_the_quantized_models_means_layer_after_layer():
    module = chain_module()
    samples = [{"x": np.abs(s["x"])} for s in sample_inputs(module, PassContext(seed=4), 8)]
    ctx = PassContext(calib_data=samples, log=lambda m: None)
    PassManager(parse_pipeline("calibrate{method=percentile percentile=90}"), quiet=True).run(module, ctx)
    float_means = [channel_means(module, samples, name) for name in ("c1", "c2")]
    empirical, sequential = module.clone(), module.clone()
    correct(empirical, ctx, weight_bits=4, samples=8)
    result = correct(sequential, ctx, mode="sequential", weight_bits=4, samples=8)
    assert result.modified and result.stats["corrected"] == 2
    c1_empirical, c2_empirical = quantized_conv_means(empirical, samples)
    c1_sequential, c2_sequential = quantized_conv_means(sequential, samples)
    # The 90th-percentile ranges clip x and the Relu output: the float-input mode misses the mean shift
    # at both convs; the sequential one restores both, up to the int32 bias step (about 1e-3 here) and
    # the shrinkage of the shifts the samples disagree on (below 1e-2 here).
    for sequential_means, empirical_means, float_mean in ((c1_sequential, c1_empirical, float_means[0]),
                                                          (c2_sequential, c2_empirical, float_means[1])):
        assert np.abs(empirical_means - float_mean).max() > 0.02
        assert np.abs(sequential_means - float_mean).max() < 1e-2
        assert np.abs(sequential_means - float_mean).sum() < 0.5 * np.abs(empirical_means - float_mean).sum()
    assert not correct(sequential, ctx, mode="sequential", weight_bits=4).modified  # annotated: done


def test_output_layers_are_left_alone_by_default():
    module = chain_module()
    samples = sample_inputs(module, PassContext(seed=4), 4)
    ctx = PassContext(calib_data=samples, log=lambda m: None)
    b2 = const_value(module.graph.nodes[-2].inputs[2]).copy()
    ctx.config = QuantConfig(weight_bits=4)
    result = BiasCorrection().run(module, ctx)
    # c2 reaches the output y through a Relu only: its mean shift is the output's, left as the float model's.
    assert result.stats["corrected"] == 1
    assert len(ctx.remarks) == 1 and "output-layers=true" in ctx.remarks[0].message
    np.testing.assert_array_equal(const_value(module.graph.nodes[-2].inputs[2]), b2)
    assert MARK not in module.annotations.get("c2", {}) and MARK in module.annotations.get("c1", {})


def test_output_layers_stop_at_the_first_layer_upstream_of_each_output():
    text = """<ir_version: 8, opset_import: ["" : 13]>
g (float[1,2,4,4] x) => (float[1,2,4,4] y, float[1,2,4,4] z)
  <float[2,2,1,1] w = {1.0, 0.5, -0.5, 1.0}, float[2,2,1,1] u = {1.0, 0.0, 0.0, 1.0}> {
  a = Conv(x, w)
  t = ConvTranspose(a, u)
  y = Relu(t)
  b = Conv(a, w)
  c = Conv(b, w)
  s = Add(b, c)
  z = Sigmoid(s)
}
"""
    module = from_onnx(infer_shapes(onnx.parser.parse_model(text)))
    found = _output_layers(module.graph)
    heads = {node.outputs[0].name for node in module.graph.nodes if id(node) in found}
    assert heads == {"t", "b", "c"}  # a feeds outputs only through t or b


def test_shifts_the_samples_disagree_on_are_shrunk():
    # Per channel, four samples' shifts: mean m, squared standard error se2 = var / 4, kept m * (1 - se2 / m^2).
    consistent = [0.50, 0.52, 0.48, 0.50]  # m 0.5, se2 6.7e-5: x 0.99973
    half = [0.3, 0.1, 0.3, 0.1]             # m 0.2, se2 3.3e-3: x 0.91667
    disputed = [0.50, -0.46, 0.55, -0.51]   # m 0.02, se2 0.085 > m^2: dropped
    shrunk = _shrunk_mean(np.array([consistent, half, disputed]).T)
    np.testing.assert_allclose(shrunk, [0.5 * (1 - 0.0008 / 3 / 4 / 0.25), 0.2 * (1 - 0.04 / 3 / 4 / 0.04), 0.0],
                               rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(_shrunk_mean(np.array([[0.7, -0.2]])), [0.7, -0.2])  # one sample: as measured


def test_sequential_declines_before_calibrate():
    module = chain_module()
    ctx = PassContext(calib_data=sample_inputs(module, PassContext(seed=4), 2), log=lambda m: None)
    assert not correct(module, ctx, mode="sequential").modified
    assert any("run calibrate first" in r.message for r in ctx.remarks)


def test_waves_put_independent_layers_together():
    text = """<ir_version: 8, opset_import: ["" : 13]>
g (float[1,2,4,4] x) => (float[1,2,4,4] y)
  <float[2,2,1,1] w = {1.0, 0.5, -0.5, 1.0}> {
  a = Conv(x, w)
  b = Conv(x, w)
  s = Add(a, b)
  r = Relu(s)
  y = Conv(r, w)
}
"""
    from passes.bias_correction import _waves
    module = from_onnx(infer_shapes(onnx.parser.parse_model(text)))
    layers = [linear_layer(n)[0] for n in module.graph.nodes if n.op == "Conv"]
    waves = _waves(module, layers)
    assert [[layer.node.outputs[0].name for layer in wave] for wave in waves] == [["a", "b"], ["y"]]


def test_float_means_are_computed_once_for_the_same_graph_and_samples(monkeypatch):
    """The judge's candidates share their float graph and samples: the second bias correction reads the first's
    float means (no session), and the same graph on other samples is computed afresh."""
    import passes.bias_correction as bias_correction
    module = golden("conv_empirical")
    data = sample_inputs(module, PassContext(seed=1), 6)
    monkeypatch.setattr(bias_correction, "FLOAT_MEANS", {})  # whatever an earlier test left
    sessions = []
    real = bias_correction.make_session
    monkeypatch.setattr(bias_correction, "make_session", lambda *a, **k: sessions.append(1) or real(*a, **k))
    first, second = module.clone(), module.clone()
    correct(first, PassContext(calib_data=data, log=lambda m: None), weight_bits=4)
    correct(second, PassContext(calib_data=data, log=lambda m: None), weight_bits=4)
    assert len(sessions) == 1
    assert first.encodings == second.encodings and all(
        np.array_equal(const_value(a), const_value(b)) for a, b in zip(first.graph.tensors().values(), second.graph.tensors().values())
        if const_value(a) is not None)
    other = [{name: value + 1 for name, value in sample.items()} for sample in data]
    correct(module.clone(), PassContext(calib_data=other, log=lambda m: None), weight_bits=4)
    assert len(sessions) == 2
