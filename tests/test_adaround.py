"""AdaRound: beats round-to-nearest on the layer output, deterministic, leaves weights exactly on the grid."""
import numpy as np

from compiler.config import QuantConfig
from compiler.encoding import fake_quantize, weight_encoding
from tests.golden_cases import GOLDEN_ROOT, GoldenCase
from compiler.ir import const_value
from compiler.linear import set_input_const
from compiler.pass_manager import PassContext
from compiler.runtime import run_model, sample_inputs
from passes.adaround import AdaRound, learn_rounding

BITS = 4


def small_conv():
    return GoldenCase(GOLDEN_ROOT / "adaround" / "conv_and_matmul").load_input()


def run_adaround(module, samples, **options):
    ctx = PassContext(calib_data=samples, log=lambda m: None, config=QuantConfig(weight_bits=BITS))
    return AdaRound(AdaRound.Options(**{"iterations": 300, **options})).run(module, ctx), ctx


def conv_output_mse(module, reference, samples):
    got = run_model(module, samples, ["c"])
    return float(np.mean([np.mean((g["c"] - r["c"]) ** 2) for g, r in zip(got, reference)]))


def test_layer_output_error_is_below_round_to_nearest():
    module = small_conv()
    samples = sample_inputs(module, PassContext(seed=3), 8)
    reference = run_model(module, samples, ["c"])
    weight = const_value(module.graph.tensors()["w"])

    nearest = module.clone()
    conv = next(n for n in nearest.graph.nodes if n.op == "Conv")
    set_input_const(nearest.graph, conv, 1, fake_quantize(weight, weight_encoding(weight, BITS, 0)))

    result, _ = run_adaround(module, samples)
    assert result.modified and result.stats["layers"] == 2
    assert result.stats["flipped-percent"] > 0
    assert conv_output_mse(module, reference, samples) < conv_output_mse(nearest, reference, samples)


def test_weights_are_on_the_recorded_grid_and_a_second_run_changes_nothing():
    module = small_conv()
    samples = sample_inputs(module, PassContext(seed=3), 4)
    run_adaround(module, samples, iterations=50)
    for name in ("w", "wm"):
        weight = const_value(module.graph.tensors()[name])
        encoding = module.encodings[name]
        assert np.array_equal(fake_quantize(weight, encoding), weight)  # quantizing again is exact
    assert module.encodings["w"].axis == 0 and module.encodings["wm"].axis is None  # MatMul per tensor, as insert-qdq
    again, _ = run_adaround(module, samples, iterations=50)
    assert not again.modified


def test_deterministic_with_a_seed():
    samples = sample_inputs(small_conv(), PassContext(seed=3), 4)
    first, second = small_conv(), small_conv()
    run_adaround(first, samples, iterations=100, positions=16, seed=5)
    run_adaround(second, samples, iterations=100, positions=16, seed=5)
    for name in ("w", "wm"):
        assert np.array_equal(const_value(first.graph.tensors()[name]), const_value(second.graph.tensors()[name]))


def test_learn_rounding_objective_and_fallback():
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((1, 6, 12))
    x = rng.standard_normal((500, 12)) @ rng.standard_normal((12, 12))  # correlated inputs: rounding errors interact
    gram = (x.T @ x / len(x))[None]
    scale = np.abs(matrix).max(axis=2, keepdims=True) / 7
    learned = learn_rounding(matrix, scale, gram, BITS, iterations=500, lr=0.01, reg=0.01)
    assert not learned.kept_nearest and learned.learned_error < learned.nearest_error
    assert np.all(np.abs(learned.codes - matrix / scale) < 1)  # each weight rounds to floor or ceil
    # With a gram of zero the objective cannot improve: round-to-nearest is kept.
    flat = learn_rounding(matrix, scale, np.zeros_like(gram), BITS, iterations=20, lr=0.01, reg=0.01)
    assert flat.kept_nearest and np.array_equal(flat.codes, np.clip(np.round(matrix / scale), -8, 7))


def test_declines_without_data():
    module = small_conv()
    ctx = PassContext(log=lambda m: None)
    result = AdaRound().run(module, ctx)
    assert not result.modified and not module.encodings
    assert any("calibration data" in r.message for r in ctx.remarks)


def test_insert_qdq_emits_exactly_the_learned_weights():
    from compiler.pass_manager import PassManager, parse_pipeline
    from onnx import numpy_helper
    module = small_conv()
    samples = sample_inputs(module, PassContext(seed=3), 4)
    run_adaround(module, samples, iterations=50)
    learned = {name: const_value(module.graph.tensors()[name]).copy() for name in ("w", "wm")}
    ctx = PassContext(calib_data=samples, log=lambda m: None)
    PassManager(parse_pipeline(f"quant{{weight-bits={BITS}}},calibrate,insert-qdq"), quiet=True).run(module, ctx)
    proto = module.to_onnx()
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    dequantized = {}
    for node in proto.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            q, scale, zero = (inits[n] for n in node.input[:3])
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            shape = [1] * q.ndim
            if scale.ndim:
                shape[axis] = -1
            dequantized[node.output[0]] = ((q.astype(np.int32) - zero.astype(np.int32).reshape(shape)).astype(np.float32)
                                           * scale.reshape(shape))
    for node in proto.graph.node:
        if node.op_type in ("Conv", "MatMul"):
            name = "w" if node.op_type == "Conv" else "wm"
            assert np.array_equal(dequantized[node.input[1]], learned[name]), name


def test_input_noise_term_rounds_towards_zero():
    # With no signal term left, E[(W~ n)^2] = noise * |W~|^2: every weight should round towards zero.
    rng = np.random.default_rng(1)
    matrix = rng.standard_normal((1, 4, 10))
    scale = np.abs(matrix).max(axis=2, keepdims=True) / 7
    result = learn_rounding(matrix, scale, np.zeros((1, 10, 10)), BITS, iterations=300, lr=0.05, reg=0.01, noise=1.0)
    assert not result.kept_nearest
    np.testing.assert_array_equal(result.codes, np.trunc(matrix / scale))
