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


def test_a_sample_without_an_input_is_named_before_it_runs():
    samples = _samples(3)
    del samples[1]["x"]
    with pytest.raises(QccError, match="calibration sample 1: missing input 'x'"):
        collect(_module(), samples, activation_tensors(_module()), "histogram")


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


# --- observers derived instead of counted (calibration.REPETITIONS) ---------------------------------

def _chain_module(nodes, shape=(1, 2, 4, 4), consts=None):
    """Input x, then ``nodes`` as (op, inputs, output, attributes); the last output is the graph output."""
    from onnx import TensorProto, helper, numpy_helper
    graph = helper.make_graph(
        [helper.make_node(op, inputs, [output], **attrs) for op, inputs, output, attrs in nodes], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(nodes[-1][2], TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.asarray(value), name) for name, value in (consts or {}).items()])
    return from_onnx(infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])))


def _op_module(op, extra=(), attrs=None):
    """x -> a = Mul(x, 2) -> y = op(a, *extra), extra inputs as constants (None for an absent optional one)."""
    consts = {f"k{i}": value for i, value in enumerate(extra) if value is not None}
    names = ["" if value is None else f"k{i}" for i, value in enumerate(extra)]
    return _chain_module([("Mul", ["x", "two"], "a", {}), (op, ["a", *names], "y", attrs or {})],
                         consts={"two": np.float32(2.0), **consts})


def _growing_samples(shape=(1, 2, 4, 4), seed=0):
    """Ranges that grow (so histograms widen and coarsen), with NaN and infinities in one sample."""
    rng = np.random.default_rng(seed)
    samples = [{"x": (rng.standard_normal(shape) * scale + shift).astype(np.float32)}
               for scale, shift in ((0.01, 0.0), (1.0, 0.5), (40.0, -3.0), (2.0, 1.0))]
    samples[1]["x"].reshape(-1)[:3] = [np.nan, np.inf, -np.inf]
    return samples


def _assert_same_observer(derived, counted):
    assert (derived.min, derived.max) == (counted.min, counted.max)
    if isinstance(counted, HistogramObserver):
        assert (derived.exponent, derived.origin) == (counted.exponent, counted.origin)
        np.testing.assert_array_equal(derived.counts, counted.counts)


def _scales(*factors):
    return np.array(factors, dtype=np.float32)


NEAREST = {"mode": "nearest"}
ASYMMETRIC_FLOOR = {**NEAREST, "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}
DERIVED_CASES = {  # case: (op, extra inputs (roi None: absent), attributes, times each value repeats)
    "Identity": ("Identity", (), {}, 1),
    "Reshape": ("Reshape", (np.array([4, -1], dtype=np.int64),), {}, 1),
    "Flatten": ("Flatten", (), {"axis": 2}, 1),
    "Squeeze": ("Squeeze", (np.array([0], dtype=np.int64),), {}, 1),
    "Unsqueeze": ("Unsqueeze", (np.array([0], dtype=np.int64),), {}, 1),
    "Transpose": ("Transpose", (), {"perm": [0, 2, 3, 1]}, 1),
    "Resize asymmetric floor": ("Resize", (None, _scales(1, 1, 2, 4)), ASYMMETRIC_FLOOR, 8),
    "Resize half_pixel round_prefer_floor": ("Resize", (None, _scales(1, 1, 2, 2)), NEAREST, 4),
    "Resize half_pixel round_prefer_ceil, sizes": ("Resize", (None, None, np.array([1, 2, 16, 8], dtype=np.int64)),
                                                   {**NEAREST, "nearest_mode": "round_prefer_ceil"}, 8),
    "Resize pytorch_half_pixel": ("Resize", (None, _scales(1, 2, 4, 2)),
                                  {**NEAREST, "coordinate_transformation_mode": "pytorch_half_pixel"}, 16),
}


@pytest.mark.parametrize("method", ["histogram", "minmax"])
@pytest.mark.parametrize("case", DERIVED_CASES)
def test_derived_observer_equals_the_counted_one(case, method):
    op, extra, attrs, times = DERIVED_CASES[case]
    module, samples = _op_module(op, extra, attrs), _growing_samples()
    assert calibration.derived_tensors(module, ["x", "a", "y"]) == {"y": ("a", times)}
    derived, _ = collect(module, samples, ["x", "a", "y"], method)
    assert calibration.derived_tensors(module, ["y"]) == {}  # its source not observed: counted
    counted, _ = collect(module, samples, ["y"], method)
    _assert_same_observer(derived["y"], counted["y"])
    if method == "histogram":
        assert derived["y"].counts.sum() == times * derived["a"].counts.sum() > 0


@pytest.mark.parametrize("scales, attrs", [
    (_scales(1, 1, 2, 2), {"mode": "linear"}),
    (_scales(1, 1, 3, 3), ASYMMETRIC_FLOOR),  # not a power of two
    (_scales(1, 1, 4, 4), {**NEAREST, "coordinate_transformation_mode": "asymmetric"}),  # round: edge pixels fewer
    (_scales(1, 1, 2, 2), {**NEAREST, "coordinate_transformation_mode": "align_corners"}),
    (_scales(1, 1, 0.5, 0.5), NEAREST),
])
def test_resizes_that_do_not_repeat_every_value_alike_are_counted(scales, attrs):
    assert calibration.derived_tensors(_op_module("Resize", (None, scales), attrs), ["a", "y"]) == {}


def _resize_flatten_module(shape):
    return _chain_module([("Resize", ["x", "", "s"], "r", NEAREST), ("Flatten", ["r"], "y", {})], shape,
                         {"s": _scales(1, 1, 2, 2)})


def test_derivations_follow_chains():
    module, samples = _resize_flatten_module((1, 2, 4, 4)), _growing_samples()
    assert calibration.derived_tensors(module, ["x", "r", "y"]) == {"r": ("x", 4), "y": ("x", 4)}
    derived, _ = collect(module, samples, ["x", "r", "y"], "histogram")
    counted, _ = collect(module, samples, ["y"], "histogram")
    _assert_same_observer(derived["y"], counted["y"])


def test_an_empty_tensor_is_not_derived_from_an_unknown_factor():
    module = _resize_flatten_module((1, 0, 2, 2))
    assert calibration.derived_tensors(module, ["x", "r", "y"]) == {"y": ("r", 1)}
    observers, _ = collect(module, [{"x": np.zeros((1, 0, 2, 2), np.float32)}] * 2, ["x", "r", "y"], "histogram")
    assert observers["y"].empty and observers["y"].exponent is None


def test_histogram_keeps_a_value_rounded_onto_the_upper_edge():
    # With origin -4000 the float32 index of 3.99999 / 0.5 - origin rounds up to 4008 = len(counts).
    obs = HistogramObserver()
    obs.update(np.array([-2000.0, 3.99999], dtype=np.float32))
    assert (obs.exponent, obs.origin, len(obs.counts)) == (-1, -4000, 4008)
    assert obs.counts[0] == 1 and obs.counts[-1] == 1 and obs.counts.sum() == 2


def test_histogram_bins_tensors_longer_than_a_chunk():
    x = np.random.default_rng(8).standard_normal(3 * calibration.CHUNK + 5).astype(np.float32)
    obs = HistogramObserver()
    obs.update(x)
    # The float32 index arithmetic of the whole tensor at once (not floor(x / w): that rounds differently).
    index = (x * np.float32(2.0 ** -obs.exponent) - np.float32(obs.origin)).astype(np.intp)
    expected = np.bincount(index, minlength=len(obs.counts))
    np.testing.assert_array_equal(obs.counts, expected)


def test_a_value_budget_bins_every_kth_value_and_counts_it_k_times():
    x = np.arange(1000, dtype=np.float32)
    obs = HistogramObserver()
    obs.update(x, values=100)  # stride 11: 10 gets there, and the stride is odd
    assert obs.counts.sum() == 11 * len(range(0, 1000, 11))
    assert (obs.min, obs.max) == (0.0, 999.0)  # min and max see every value
    binned = np.floor(x[::11] / obs.width).astype(int) - obs.origin
    np.testing.assert_array_equal(np.flatnonzero(obs.counts), np.unique(binned))
    small = HistogramObserver()
    small.update(x, values=1000)  # within the budget: every value
    assert small.counts.sum() == 1000


def test_a_value_budget_reaches_an_outlier_at_a_fixed_position_in_one_sample_of_k():
    sample = np.zeros(99, dtype=np.float32)
    sample[50] = 40.0  # the same position in every sample, as a transformer's outlier channel
    obs = HistogramObserver()
    for _ in range(9):
        obs.update(sample, values=33)  # stride 3
    assert obs.max == 40.0
    assert obs.counts.sum() == 9 * 99
    assert obs.counts[int(40.0 // obs.width) - obs.origin] == 3 * 3  # binned in 3 samples of 9, counted 3 times each


def test_collect_bins_a_share_of_each_sample_that_keeps_the_whole_set_near_the_budget(monkeypatch):
    monkeypatch.setattr(calibration, "HISTOGRAM_VALUES", 6 * 8)
    monkeypatch.setattr(calibration, "SAMPLE_VALUES", 4)
    module = _module()
    observers, _ = collect(module, _samples(6), ["x", "c"], "mse")
    # 32 values a sample, 8 binned (stride 5: 7 or 6 of them), each counted 5 times; min and max exact.
    assert all(obs.counts.sum() in range(6 * 30, 6 * 35 + 1) for obs in observers.values())
    every = collect(module, _samples(6), ["x"], "minmax")[0]["x"]
    assert (observers["x"].min, observers["x"].max) == (every.min, every.max)


class AddAtHistogram(HistogramObserver):
    """The counting before np.bincount (np.add.at on the same indices): the reference the counts must equal."""

    def update(self, x):
        x, lo, hi = calibration._finite(x)
        if not x.size:
            return
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        if self.exponent is None:
            span = max(hi, 0.0) - min(lo, 0.0)
            finest = np.floor(np.log2(calibration.MIN_RANGE / self.capacity))
            self.exponent = int(max(np.ceil(np.log2(span / self.capacity)), finest)) if span > 0 \
                else calibration._FIRST_WIDTH_EXPONENT
        self._cover(lo, hi)
        dtype = np.float32 if abs(self.origin) + len(self.counts) < 2 ** 22 else np.float64
        index = (x * dtype(2.0 ** -self.exponent)).astype(dtype) - dtype(self.origin)
        counts = np.zeros(len(self.counts) + 1, dtype=np.intp)
        np.add.at(counts, index.astype(np.int32).astype(np.intp), 1)
        counts[-2] += counts[-1]
        self.counts += counts[:-1]


@pytest.mark.parametrize("seed", range(4))
def test_bincount_counts_as_add_at_did_through_growth_and_rebinning(seed):
    rng = np.random.default_rng(seed)
    new, old = HistogramObserver(bins=256), AddAtHistogram(bins=256)
    for scale, offset, size in ((0.001, 0.0, 50), (1.0, 0.5, 3 * calibration.CHUNK + 7), (40.0, -10.0, 5000),
                                (2.0, 0.0, 20000), (0.5, 3e6, 100)):  # grows, coarsens, then far from zero
        x = (rng.standard_normal(size) * scale + offset).astype(np.float32)
        x[rng.integers(0, size, 3)] = [np.nan, np.inf, -np.inf]
        new.update(x)
        old.update(x)
        assert (new.exponent, new.origin, new.min, new.max) == (old.exponent, old.origin, old.min, old.max)
        np.testing.assert_array_equal(new.counts, old.counts)
    # Merged (as shards of a calibration are): still the same.
    other_new, other_old = HistogramObserver(bins=256), AddAtHistogram(bins=256)
    y = rng.standard_normal(1000).astype(np.float32)
    other_new.update(y)
    other_old.update(y)
    np.testing.assert_array_equal(other_new.merge(new).counts, other_old.merge(old).counts)
