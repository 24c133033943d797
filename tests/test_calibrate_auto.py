"""calibrate{method=auto}: per-tensor choice among min-max, percentile and MSE by quantization SQNR."""
import math

import numpy as np
import onnx.parser

from compiler.calibration import AUTO_CANDIDATES, CACHE_KEY, HistogramObserver, choose_encoding, encoding_from_observer, histogram_sqnr
from compiler.encoding import fake_quantize
from compiler.ir import from_onnx, infer_shapes
from compiler.pass_manager import PassContext
from compiler.runtime import sample_inputs
from passes.calibrate import CHOICES_KEY, Calibrate


def observe(values) -> HistogramObserver:
    observer = HistogramObserver()
    observer.update(np.asarray(values, dtype=np.float32))
    return observer


def true_sqnr(values, enc) -> float:
    values = np.asarray(values, dtype=np.float64)
    return 10 * math.log10(np.sum(values ** 2) / np.sum((values - fake_quantize(values, enc)) ** 2))


def test_histogram_sqnr_matches_the_data():
    values = np.random.default_rng(0).standard_normal(200_000)
    observer = observe(values)
    for method in ("minmax", "percentile", "mse"):
        enc = encoding_from_observer(observer, method, 8)
        assert abs(histogram_sqnr(observer, enc) - true_sqnr(values, enc)) < 0.3, method


def test_choice_is_the_best_candidate_on_the_data():
    rng = np.random.default_rng(1)
    distributions = {
        "normal": rng.standard_normal(100_000),
        "uniform": rng.uniform(0.0, 4.0, 100_000),
        "relu": np.maximum(rng.standard_normal(100_000), 0),
        "laplace": rng.laplace(0.0, 1.0, 100_000),
        "outliers": np.concatenate([rng.standard_normal(100_000), [80.0, -60.0]]),
    }
    for label, values in distributions.items():
        observer = observe(values)
        method, enc, _ = choose_encoding(observer, 8)
        measured = {m: true_sqnr(values, encoding_from_observer(observer, m, 8)) for m in AUTO_CANDIDATES}
        assert true_sqnr(values, enc) >= max(measured.values()) - 0.05, (label, method, measured)
    assert choose_encoding(observe(distributions["outliers"]), 8)[0] != "minmax"


def test_pass_records_its_choices():
    module = from_onnx(infer_shapes(onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 13]>
g (float[1,4,16,16] x) => (float[1,4,16,16] sq, float[1,4,16,16] s)
  <float[1] three = {3.0}> {
  sq = Mul(x, x)
  t = Mul(x, three)
  s = Sigmoid(t)
}
""")))
    ctx = PassContext(calib_data=sample_inputs(module, PassContext(seed=0), 4), log=lambda m: None)
    result = Calibrate(Calibrate.Options(method="auto")).run(module, ctx)
    choices = module.cache[CHOICES_KEY]
    assert set(choices) == {"x", "sq", "t"}  # the Sigmoid output has its fixed range, no choice
    assert sum(v for k, v in result.stats.items() if k.startswith("auto-")) == result.stats["encoded"] == 3
    observers = module.cache[CACHE_KEY].observers
    for name, (method, _) in choices.items():
        assert module.encodings[name] == encoding_from_observer(observers[name], method, 8)
    assert not Calibrate(Calibrate.Options(method="auto")).run(module, ctx).modified
