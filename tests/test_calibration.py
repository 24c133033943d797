"""Observers, the streaming collector and the calibrate pass."""
import numpy as np
import onnx.parser
import pytest

import compiler.calibration as calibration
from compiler.calibration import HistogramObserver, MinMaxObserver, activation_tensors, collect
from compiler.encoding import activation_encoding
from compiler.ir import QccError, from_onnx, infer_shapes
from compiler.pass_manager import PassContext, PassManager, parse_pipeline
from compiler.runtime import run_model

MODEL = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[1,2,4,4] x) => (float[1,2,4,4] y, float[1,2,4,4] t) <float[2,2,1,1] w = {1.0, -2.0, 0.5, 3.0}> {
  c = Conv(x, w)
  r = Relu(c)
  y = Sigmoid(r)
  t = Tanh(c)
}
"""


def _module(text=MODEL):
    return from_onnx(infer_shapes(onnx.parser.parse_model(text)))


def _samples(count=6, seed=0):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 2, 4, 4)).astype(np.float32)} for _ in range(count)]


def test_minmax_observer_update_and_merge():
    a, b = MinMaxObserver(), MinMaxObserver()
    a.update(np.array([1.0, -2.0]))
    b.update(np.array([5.0, np.inf, np.nan]))  # non-finite values are ignored
    assert a.merge(b).range() == (-2.0, 5.0)
    assert MinMaxObserver().range() == (0.0, 0.0)


def test_histogram_keeps_every_count_while_growing():
    rng = np.random.default_rng(0)
    obs = HistogramObserver(bins=64)
    total = 0
    for scale in (0.01, 1.0, 50.0, 3.0):  # the span grows twice: bins merge, none is lost
        x = rng.standard_normal(1000) * scale
        obs.update(x)
        total += x.size
    assert obs.counts.sum() == total
    assert len(obs.counts) <= obs.capacity
    edges = obs._edges()
    assert edges[0] <= obs.min and edges[-1] > obs.max


def test_histogram_merge_equals_one_pass():
    rng = np.random.default_rng(1)
    parts = [rng.standard_normal(500) * s + o for s, o in ((1, 0), (10, 5), (0.1, -3))]
    whole = HistogramObserver(bins=128)
    for part in parts:
        whole.update(part)
    merged = HistogramObserver(bins=128)
    for part in parts:
        single = HistogramObserver(bins=128)
        single.update(part)
        merged.merge(single)
    assert merged.counts.sum() == whole.counts.sum()
    # Same width and the same counts where both cover (one may have a few more empty bins).
    assert merged.exponent == whole.exponent
    lo = max(merged.origin, whole.origin)
    hi = min(merged.origin + len(merged.counts), whole.origin + len(whole.counts))
    np.testing.assert_array_equal(merged.counts[lo - merged.origin:hi - merged.origin],
                                  whole.counts[lo - whole.origin:hi - whole.origin])
    assert (merged.min, merged.max) == (whole.min, whole.max)


def test_percentile_matches_numpy_within_a_bin():
    x = np.random.default_rng(2).standard_normal(200_000)
    obs = HistogramObserver()
    obs.update(x)
    lo, hi = obs.range("percentile", percentile=99.0)
    assert abs(lo - np.percentile(x, 1.0)) <= obs.width
    assert abs(hi - np.percentile(x, 99.0)) <= obs.width
    assert obs.range("percentile", percentile=100.0) == (x.min(), x.max())


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_histogram_methods_clip_rare_outliers(method):
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.standard_normal(100_000), [80.0, -60.0]])
    obs = HistogramObserver()
    obs.update(x)
    lo, hi = obs.range(method, bw=8, percentile=99.9)
    assert 2.0 < hi < 20.0 and -20.0 < lo < -2.0


def test_mse_clips_a_heavy_tail_and_beats_minmax():
    x = np.random.default_rng(6).laplace(size=200_000)
    obs = HistogramObserver()
    obs.update(x)
    lo, hi = obs.range("mse", bw=8)
    assert x.min() < lo < 0 < hi < x.max()

    def mse(a, b):
        enc = activation_encoding(a, b, 8)
        return np.mean((x - (np.clip(np.round(x / enc.scale[0]) - enc.offset[0], 0, 255) + enc.offset[0]) * enc.scale[0]) ** 2)
    assert mse(lo, hi) < mse(x.min(), x.max())


def test_mse_keeps_full_range_of_uniform_data():
    x = np.random.default_rng(4).uniform(0.0, 6.0, 100_000)
    obs = HistogramObserver()
    obs.update(x)
    lo, hi = obs.range("mse", bw=8)
    assert lo == pytest.approx(x.min()) and hi > 5.9


def test_entropy_of_one_sided_data_starts_at_zero():
    x = np.abs(np.random.default_rng(5).standard_normal(50_000))
    obs = HistogramObserver()
    obs.update(x)
    lo, hi = obs.range("entropy", bw=8)
    assert lo == pytest.approx(x.min()) and 1.0 < hi <= x.max()


def test_collect_sees_every_activation_one_sample_at_a_time():
    module, samples = _module(), _samples()
    names = activation_tensors(module)
    assert names == ["x", "c", "r", "y", "t"]  # graph inputs and node outputs, no constants
    observers, count = collect(module, samples, names, "minmax")
    assert count == len(samples)
    ref = run_model(module, samples, outputs=["c", "r", "y", "t"])
    for name in ["c", "r", "y", "t"]:
        values = np.concatenate([r[name].ravel() for r in ref])
        assert observers[name].range() == (values.min(), values.max())
    inputs = np.concatenate([s["x"].ravel() for s in samples])
    assert observers["x"].range() == (inputs.min(), inputs.max())


def _calibrate(module, samples, pipeline="calibrate{method=minmax}"):
    ctx = PassContext(calib_data=samples, log=lambda m: None)
    manager = PassManager(parse_pipeline(pipeline), quiet=True)
    manager.run(module, ctx)
    return manager.records[-1]


def test_calibrate_fills_every_activation_with_fixed_ranges_winning():
    module, samples = _module(), _samples()
    record = _calibrate(module, samples)
    assert set(module.encodings) == {"x", "c", "r", "y", "t"}
    assert record.stats["fixed-range"] == 2 and record.stats["encoded"] == 3
    ref = run_model(module, samples, outputs=["c"])
    c = np.concatenate([r["c"].ravel() for r in ref])
    assert module.encodings["c"] == activation_encoding(c.min(), c.max(), 8)
    assert module.encodings["y"] == activation_encoding(0.0, 1.0, 8)
    assert module.encodings["t"] == activation_encoding(-1.0, 1.0, 8)
    assert module.encodings["r"].offset == (0,)


def test_calibrate_honours_annotations():
    module = _module()
    module.annotate("c", fixed_range=(-4.0, 4.0))
    module.annotate("r", act_bits=16)
    module.annotate("y", act_bits=16)
    _calibrate(module, _samples())
    assert module.encodings["c"] == activation_encoding(-4.0, 4.0, 8)
    assert module.encodings["r"].bw == 16
    assert module.encodings["y"].scale == (2.0 ** -16,) and module.encodings["y"].offset == (0,)  # QNN's 16-bit sigmoid grid


def test_calibrate_caches_statistics_and_is_idempotent(monkeypatch):
    module, samples = _module(), _samples()
    calls = []
    real = calibration.collect
    monkeypatch.setattr(calibration, "collect", lambda *a, **k: calls.append(1) or real(*a, **k))
    _calibrate(module, samples, "calibrate{method=percentile}")
    assert len(calls) == 1
    first = dict(module.encodings)
    assert not _calibrate(module, samples).modified
    module.encodings.clear()
    record = _calibrate(module, samples, "calibrate{method=mse}")  # histograms serve every method
    assert record.modified and len(calls) == 1
    assert set(module.encodings) == set(first)


def test_calibrate_without_data_is_a_clear_error():
    with pytest.raises(QccError, match="calibrate needs --calib-data"):
        _calibrate(_module(), None)


def test_calibrate_streams_a_dataset(tmp_path):
    from compiler.data import Dataset, specs_of
    module, samples = _module(), _samples(3)
    for i, s in enumerate(samples):
        np.save(tmp_path / f"{i}.npy", s["x"])
    _calibrate(module, Dataset(tmp_path, specs_of(module)))
    reference = _module()
    _calibrate(reference, samples)
    assert module.encodings == reference.encodings


def test_grid_bounds_mirror_activation_encoding():
    rng = np.random.default_rng(7)
    lows, highs = rng.uniform(-10, 1, 50), rng.uniform(-1, 10, 50)
    lows[0], highs[0] = 0.0, 0.001  # below the minimum range
    for bw in (8, 16):
        qmin, qmax, scale = calibration.grid_bounds(lows, highs, bw)
        for i in range(len(lows)):
            enc = activation_encoding(lows[i], highs[i], bw)
            assert (qmin[i], qmax[i], scale[i]) == pytest.approx((enc.min[0], enc.max[0], enc.scale[0]), rel=1e-12, abs=1e-15)
