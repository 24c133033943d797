"""Activation statistics: observers with small, mergeable state, fed one sample at a time.

One onnxruntime session exposes every float activation that needs statistics;
each sample's activations go into the observers and are dropped, so memory is
bounded by one sample's activations whatever the number of samples. The samples go
in fixed shards of ``SHARD_SAMPLES``, each observed on its own (in this process or as
a Ray task) and merged in shard order: the same observers on any number of workers.

Binning values is the largest part of a compile (det: 20 M values a sample), so:
- values are binned ``CHUNK`` at a time, so the work arrays stay in cache instead of
  streaming a tensor-sized temporary through memory for each step, and counted with
  ``np.bincount`` on intp indices (timings against ``np.add.at``: docs/measurements.md);
- an activation that holds exactly another observed activation's values, each ``k``
  times, is not counted: its observer is that one's with the counts times ``k``
  (``derived_tensors``; table ``REPETITIONS``: Reshape, Flatten, Squeeze, Unsqueeze,
  Transpose, Identity, and nearest Resize by powers of two where every pixel is
  repeated alike). Exact, not approximate: fed the same min and max, both observers
  grow, coarsen and bin alike. Relu and Concat are not in the table: their outputs'
  histograms start at another ``origin``, and the float32 bin index ``x / w - origin``
  rounds a value just below a bin edge into the next bin depending on that origin, so a
  derived histogram would differ from the counted one in those bins.
- one thread updates the observers: the counting holds the GIL and onnxruntime's
  intra-op threads spin on the other core between runs, so a second thread gains nothing.

Timings and what else was tried: docs/measurements.md.

Observers
- ``MinMaxObserver``: running min and max.
- ``HistogramObserver``: a histogram that serves the percentile, entropy (KL) and
  MSE range searches. It is single pass with exact re-binning: bin edges sit at
  integer multiples of a power-of-two width ``w`` (anchored at 0), at most
  ``2 * bins`` bins are kept, and when data falls outside the covered span the
  width doubles, merging bin pairs exactly. So no first min-max pass is needed,
  the observed span always has between ``bins / 2`` and ``2 * bins`` bins, and two
  histograms (e.g. from two workers) merge exactly: coarsen the finer one, add. A large
  tensor is binned on a budget (``HISTOGRAM_VALUES`` over the calibration set, at least
  ``SAMPLE_VALUES`` a sample): every k-th value, k odd, from an offset that moves on with
  each sample, counted k times. A fixed offset had lost the same positions in every sample
  and cost rec 0.005 of cosine; the moving one left every fetched model within its
  sample-to-sample spread (docs/measurements.md).

Range searches (each returns ``(lo, hi)``, widened to contain 0 by the encoding):
- percentile ``p``: lo = the (100 - p)-th percentile, hi = the p-th (each tail
  loses ``100 - p`` % of the mass), interpolated inside a bin;
- entropy: TensorRT's KL-divergence threshold on the histogram of ``|x|``, with
  ``2^bw - 1`` quantized bins for one-sided tensors and ``2^(bw-1)`` for two-sided
  ones (each side gets half the levels); at most ``ENTROPY_CANDIDATES`` thresholds
  are tried, evenly spaced, to bound the cost;
- mse: the range minimising the expected quantization error on the histogram,
  error(x) = (x - clamp(x))^2 + scale^2 / 12, searched by coordinate descent
  over the upper then the lower end (``MSE_CANDIDATES`` candidates each).
"""
from __future__ import annotations

import hashlib
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from compiler.encoding import MIN_RANGE, activation_encoding, fake_quantize
from compiler.ir import Module, QccError, const_value

METHODS = ("minmax", "percentile", "entropy", "mse")
ENTROPY_CANDIDATES = 256
MSE_CANDIDATES = 100
CHUNK = 1 << 16  # values binned at a time: the work arrays stay in cache
_FIRST_WIDTH_EXPONENT = -40  # bin width for a histogram that has only seen zeros


class MinMaxObserver:
    def __init__(self):
        self.min = math.inf
        self.max = -math.inf

    @property
    def empty(self) -> bool:
        return self.min > self.max

    def update(self, x: np.ndarray, values: int | None = None) -> None:
        x, lo, hi = _finite(x)
        if x.size:
            self.min, self.max = min(self.min, lo), max(self.max, hi)

    def merge(self, other: "MinMaxObserver") -> "MinMaxObserver":
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        return self

    def repeated(self, times: int) -> "MinMaxObserver":
        """The observer that would have seen every value seen here ``times`` times."""
        twin = MinMaxObserver()
        twin.min, twin.max = self.min, self.max
        return twin

    def range(self, method: str = "minmax", *, percentile: float = 99.99, bw: int = 8) -> tuple[float, float]:
        if method != "minmax":
            raise ValueError(f"a min-max observer cannot compute a {method} range")
        return (self.min, self.max) if not self.empty else (0.0, 0.0)


class HistogramObserver(MinMaxObserver):
    """Counts in bins [k*w, (k+1)*w) for k in [origin, origin + len(counts)), w = 2**exponent."""

    def __init__(self, bins: int = 2048):
        super().__init__()
        self.bins = bins
        self.capacity = 2 * bins
        self.updates = 0
        self.exponent: int | None = None
        self.origin = 0
        self.counts = np.zeros(0, dtype=np.float64)

    @property
    def width(self) -> float:
        return 2.0 ** self.exponent

    def update(self, x: np.ndarray, values: int | None = None) -> None:
        """Count ``x``; min and max always see every value. ``values``: bin about that many of them, every
        k-th for the least odd k that gets there (odd: no aliasing with power-of-two rows), each counted k
        times, so that a sample's weight in the histogram stays its size. The first binned value moves on by
        one with each update: an outlier that sits at the same position in every sample (a channel of a
        transformer's massive activations) is then binned in one sample of k, not in all or none."""
        x, lo, hi = _finite(x)
        if not x.size:
            return
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        stride = 1 if values is None or x.size <= values else -(-x.size // values) | 1
        x = x[self.updates % stride::stride]
        self.updates += 1
        if self.exponent is None:
            span = max(hi, 0.0) - min(lo, 0.0)
            # Bins finer than MIN_RANGE / capacity resolve nothing an encoding can (its range is at least MIN_RANGE),
            # and for denormal data (1e-40) the bin scale 2^-exponent would overflow float32.
            finest = math.floor(math.log2(MIN_RANGE / self.capacity))
            self.exponent = max(math.ceil(math.log2(span / self.capacity)), finest) if span > 0 else _FIRST_WIDTH_EXPONENT
        self._cover(lo, hi)
        # Index = floor(x / w) - origin >= 0, so truncation is floor; w is a power of two, so x * (1 / w) is exact.
        # float32 holds every bin index exactly below 2^24; data far from zero needs float64.
        dtype = np.float32 if abs(self.origin) + len(self.counts) < 2 ** 22 else np.float64
        scale, origin = dtype(2.0 ** -self.exponent), dtype(self.origin)
        # One spare bin: float32 rounding can put a value on the upper edge of the last bin.
        bins = len(self.counts) + 1
        counts = np.zeros(bins, dtype=np.intp)
        scaled, index32, index = _work_arrays(dtype)
        for start in range(0, x.size, CHUNK):
            part = x[start:start + CHUNK]
            n = part.size
            np.multiply(part, scale, out=scaled[:n], dtype=dtype)
            scaled[:n] -= origin
            np.copyto(index32[:n], scaled[:n], casting="unsafe")  # float -> int32 -> intp is faster than -> intp
            np.copyto(index[:n], index32[:n])  # bincount casts other integers to intp itself, more slowly
            counts += np.bincount(index[:n], minlength=bins)
        counts[-2] += counts[-1]
        self.counts += counts[:-1] * stride

    def _cover(self, lo: float, hi: float) -> None:
        """Grow (and coarsen as needed) so that [lo, hi] falls inside the covered bins."""
        k_lo, k_hi = math.floor(lo / self.width), math.floor(hi / self.width)
        if self.counts.size:
            k_lo, k_hi = min(k_lo, self.origin), max(k_hi, self.origin + len(self.counts) - 1)
        shift = 0
        while (k_hi >> shift) - (k_lo >> shift) + 1 > self.capacity:
            shift += 1
        if shift:
            self._coarsen(shift)
            k_lo, k_hi = k_lo >> shift, k_hi >> shift
        if not self.counts.size:
            self.origin, self.counts = k_lo, np.zeros(k_hi - k_lo + 1)
            return
        end = self.origin + len(self.counts)
        if k_lo < self.origin or k_hi >= end:
            self.counts = np.concatenate([np.zeros(self.origin - k_lo), self.counts, np.zeros(max(k_hi + 1 - end, 0))])
            self.origin = k_lo

    def _coarsen(self, shift: int) -> None:
        """Double the bin width ``shift`` times, merging groups of 2**shift bins exactly."""
        self.exponent += shift
        if not self.counts.size:
            return
        k = np.arange(self.origin, self.origin + len(self.counts)) >> shift
        new_origin = int(k[0])
        self.counts = np.bincount(k - new_origin, weights=self.counts)
        self.origin = new_origin

    def merge(self, other: "HistogramObserver") -> "HistogramObserver":
        if other.exponent is None:
            return self
        if self.exponent is None:
            self.exponent, self.origin, self.counts = other.exponent, other.origin, other.counts.copy()
            self.min, self.max = other.min, other.max
            return self
        other = other.copy()
        if other.exponent < self.exponent:
            other._coarsen(self.exponent - other.exponent)
        elif self.exponent < other.exponent:
            self._coarsen(other.exponent - self.exponent)
        self.min, self.max = min(self.min, other.min), max(self.max, other.max)
        self._cover(other.origin * other.width, (other.origin + len(other.counts)) * other.width - other.width / 2)
        if other.exponent < self.exponent:  # _cover coarsened self; bring other along
            other._coarsen(self.exponent - other.exponent)
        start = other.origin - self.origin
        self.counts[start:start + len(other.counts)] += other.counts
        return self

    def copy(self) -> "HistogramObserver":
        twin = HistogramObserver(self.bins)
        twin.min, twin.max, twin.exponent, twin.origin, twin.counts = self.min, self.max, self.exponent, self.origin, self.counts.copy()
        twin.updates = self.updates
        return twin

    def repeated(self, times: int) -> "HistogramObserver":
        # Exact (see the module docstring): fed the same min and max, the twin would have grown, coarsened and
        # binned alike, and every count is an integer (exact in float64).
        twin = self.copy()
        twin.counts *= times
        return twin

    # --- range searches -------------------------------------------------------------------------

    def range(self, method: str = "minmax", *, percentile: float = 99.99, bw: int = 8) -> tuple[float, float]:
        if self.empty:
            return 0.0, 0.0
        if method == "minmax":
            return self.min, self.max
        if method == "percentile":
            return self._percentile_range(percentile)
        if method == "entropy":
            return self._entropy_range(bw)
        if method == "mse":
            return self._mse_range(bw)
        raise ValueError(f"unknown calibration method '{method}'")

    def _edges(self) -> np.ndarray:
        return (np.arange(len(self.counts) + 1) + self.origin) * self.width

    def _percentile_range(self, percentile: float) -> tuple[float, float]:
        total = self.counts.sum()
        cdf = np.concatenate([[0.0], np.cumsum(self.counts)]) / total
        edges = self._edges()
        tail = (100.0 - percentile) / 100.0
        lo = float(np.interp(tail, cdf, edges)) if tail > 0 else self.min
        hi = float(np.interp(1.0 - tail, cdf, edges)) if tail > 0 else self.max
        return max(lo, self.min), min(hi, self.max)

    def _abs_histogram(self) -> np.ndarray:
        """Counts of |x| in bins [j*w, (j+1)*w): negative bin k (covering (-(j+1)w, -jw]) folds onto j = -k-1."""
        k = np.arange(self.origin, self.origin + len(self.counts))
        j = np.where(k >= 0, k, -k - 1)
        return np.bincount(j, weights=self.counts)

    def _entropy_range(self, bw: int) -> tuple[float, float]:
        hist = self._abs_histogram()
        if len(hist) > 1:
            # The spike of exact zeros after Relu would dominate the KL and drag the threshold down
            # (pytorch-quantization flattens it the same way).
            hist[0] = hist[1]
        one_sided = self.min >= 0 or self.max <= 0
        levels = 2 ** bw - 1 if one_sided else 2 ** (bw - 1)
        n = len(hist)
        if n <= levels:
            return self.min, self.max
        candidates = np.unique(np.linspace(levels, n, min(ENTROPY_CANDIDATES, n - levels + 1)).round().astype(int))
        divergences = [_kl_after_quantization(hist, i, levels) for i in candidates]
        threshold = float(candidates[int(np.argmin(divergences))]) * self.width
        return max(self.min, -threshold), min(self.max, threshold)

    def _mse_range(self, bw: int) -> tuple[float, float]:
        edges = self._edges()
        centers = (edges[:-1] + edges[1:]) / 2
        weights = self.counts / self.counts.sum()
        lo, hi = min(self.min, 0.0), max(self.max, 0.0)
        work = np.empty((MSE_CANDIDATES, len(centers)))  # one work array for both searches: half the time

        def error(lows: np.ndarray, highs: np.ndarray) -> np.ndarray:
            qmin, qmax, scale = grid_bounds(lows, highs, bw)
            np.clip(centers[None, :], qmin[:, None], qmax[:, None], out=work)
            np.subtract(centers[None, :], work, out=work)
            return np.square(work, out=work) @ weights + scale * scale / 12

        fractions = np.linspace(1.0 / MSE_CANDIDATES, 1.0, MSE_CANDIDATES)
        if hi > 0:
            hi = float(hi * fractions[np.argmin(error(np.full(MSE_CANDIDATES, lo), hi * fractions))])
        if lo < 0:
            lo = float(lo * fractions[np.argmin(error(lo * fractions, np.full(MSE_CANDIDATES, hi)))])
        return max(lo, self.min), min(hi, self.max)


def grid_bounds(lows: np.ndarray, highs: np.ndarray, bw: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(min, max, scale) of ``activation_encoding(lo, hi, bw)`` for arrays of ranges, vectorised."""
    lows, highs = np.minimum(lows, 0.0), np.maximum(highs, 0.0)
    highs = np.where(highs - lows < MIN_RANGE, lows + MIN_RANGE, highs)
    levels = 2 ** bw - 1
    scale = (highs - lows) / levels
    offset = np.clip(np.round(lows / scale), -levels, 0)
    scale = scale.astype(np.float32).astype(np.float64)
    return offset * scale, (offset + levels) * scale, scale


def _kl_after_quantization(hist: np.ndarray, i: int, levels: int) -> float:
    """KL(P || Q): P = hist[:i] with the tail folded into bin i-1, Q = hist[:i] squeezed into ``levels`` bins."""
    reference = hist[:i].copy()
    reference[-1] += hist[i:].sum()
    kept = hist[:i]
    starts = (np.arange(levels) * i) // levels
    sums = np.add.reduceat(kept, starts)
    nonzero = np.add.reduceat((kept > 0).astype(np.float64), starts)
    chunk = np.repeat(np.arange(levels), np.diff(np.append(starts, i)))
    expanded = np.where(kept > 0, (sums / np.maximum(nonzero, 1))[chunk], 0.0)
    p = reference / reference.sum()
    q_total = expanded.sum()
    if q_total == 0:
        return math.inf
    q = expanded / q_total
    mask = p > 0
    # Where P has mass and Q has none, KL is infinite; TensorRT smooths Q instead.
    q_masked = np.where(q[mask] > 0, q[mask], 1e-12)
    return float(np.sum(p[mask] * np.log(p[mask] / q_masked)))


_WORK = threading.local()


def _work_arrays(dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """This thread's CHUNK-sized work arrays for HistogramObserver.update, made once: fresh ones cost their
    page faults again on every update."""
    arrays = _WORK.__dict__.setdefault("arrays", {})
    if dtype not in arrays:
        arrays[dtype] = (np.empty(CHUNK, dtype), np.empty(CHUNK, np.int32), np.empty(CHUNK, np.intp))
    return arrays[dtype]


def _finite(x: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(flat finite values, min, max); NaN and infinities are dropped (they would make any range useless)."""
    x = np.asarray(x).ravel()
    if x.dtype.kind != "f":
        x = x.astype(np.float32)
    if not x.size:
        return x, math.inf, -math.inf
    lo, hi = float(x.min()), float(x.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):  # NaN or an infinity reaches min or max
        x = x[np.isfinite(x)]
        if not x.size:
            return x, math.inf, -math.inf
        lo, hi = float(x.min()), float(x.max())
    return x, lo, hi


def make_observer(method: str, bins: int = 2048) -> MinMaxObserver:
    if method not in METHODS + ("histogram",):
        raise QccError(f"unknown calibration method '{method}'; valid methods: {', '.join(METHODS)}")
    return MinMaxObserver() if method == "minmax" else HistogramObserver(bins)  # "histogram" and the histogram methods


# --- collecting statistics over a model ---------------------------------------------------------

def is_float(tensor) -> bool:
    return tensor.dtype is not None and np.issubdtype(np.dtype(tensor.dtype), np.floating)


def activation_tensors(module: Module) -> list[str]:
    """Float tensors computed at run time (graph inputs and node outputs, not constants), in graph order."""
    names, seen = [], set()
    candidates = list(module.graph.inputs) + [t for node in module.graph.nodes for t in node.outputs]
    for tensor in candidates:
        if tensor.name and tensor.name not in seen and is_float(tensor) and const_value(tensor) is None:
            seen.add(tensor.name)
            names.append(tensor.name)
    return names


SHARD_SAMPLES = 32  # calibration samples per unit of work; fixed, so the merge is the same on any number of workers
# A histogram bins about HISTOGRAM_VALUES of a tensor's values over the whole calibration set, and at least
# SAMPLE_VALUES of each sample's: binning is most of calibration's time, and beyond a few million values the
# ranges the searches choose no longer move (docs/measurements.md). Min and max see every value.
HISTOGRAM_VALUES = 1 << 22
SAMPLE_VALUES = 1 << 16


def collect(module: Module, data, tensors: list[str], method: str = "minmax", bins: int = 2048,
            label: str = "calibrate", runner=None) -> tuple[dict, int]:
    """Run ``data`` through the float model once; returns ({tensor: observer}, number of samples).

    ``method`` "minmax" keeps min/max only; any other method keeps histograms. The samples go in shards of
    SHARD_SAMPLES, each observed on its own (``runner``: in this process, or as Ray tasks,
    compiler.cluster) and merged in shard order, so the observers do not depend on who counted them.
    """
    from compiler.cluster import LocalRunner
    from compiler.runtime import expose_tensors
    inputs = {t.name for t in module.graph.inputs}
    derived = derived_tensors(module, tensors)
    counted = [name for name in tensors if name not in derived]
    outputs = [name for name in counted if name not in inputs]
    if not hasattr(data, "__getitem__"):
        data = list(data)
    total = len(data)
    if total == 0:
        raise QccError("calibration data is empty")
    model = expose_tensors(module.to_onnx(), outputs, copy=False).SerializeToString()
    values = max(SAMPLE_VALUES, HISTOGRAM_VALUES // total)
    shared = ShardInputs(model, data, counted, inputs, dict(module.input_defaults), method, bins, values)
    shards = [(start, min(start + SHARD_SAMPLES, total)) for start in range(0, total, SHARD_SAMPLES)]
    label = f"{label} ({total} samples, {len(shards)} shard(s))"
    # Merged into fresh observers: a task's arrays come back read-only from Ray's object store.
    observers = {name: make_observer(method, bins) for name in counted}
    for part in (runner or LocalRunner()).map(observe_shard, shards, shared, label):
        observers = {name: observers[name].merge(part[name]) for name in counted}
    for name, (source, times) in derived.items():
        observers[name] = observers[source].repeated(times)
    return observers, total


@dataclass
class ShardInputs:
    """What every calibration shard reads: the float model (serialized, ``counted`` exposed) and the samples."""
    model: bytes
    data: object          # a Dataset (file paths: each task reads its own files) or a list of input dicts
    counted: list
    inputs: set
    input_defaults: dict
    method: str
    bins: int
    values: int           # a histogram's binned values per sample (HistogramObserver.update)


def observe_shard(shared: ShardInputs, shard: tuple[int, int]) -> dict:
    """Observers of ``shared.counted`` over samples [start, end) of ``shared.data``."""
    from compiler.runtime import make_session
    outputs = [name for name in shared.counted if name not in shared.inputs]
    session = make_session(shared.model)
    observers = {name: make_observer(shared.method, shared.bins) for name in shared.counted}

    def load_and_run(index: int) -> tuple[dict, list]:
        sample = shared.data[index]
        missing = [name for name in shared.counted
                   if name in shared.inputs and name not in sample and name not in shared.input_defaults]
        if missing:
            raise QccError(f"calibration sample {index}: missing input '{missing[0]}'")
        return sample, session.run(outputs, sample)

    # The next sample is read and run on a second thread while this one counts the last: onnxruntime and
    # image decoding leave the GIL, and the counting stays in sample order, so the observers are the same.
    with ThreadPoolExecutor(max_workers=1) as ahead:
        pending = ahead.submit(load_and_run, shard[0]) if shard[0] < shard[1] else None
        for index in range(*shard):
            sample, values = pending.result()
            if index + 1 < shard[1]:
                pending = ahead.submit(load_and_run, index + 1)
            _observe_sample(shared, observers, outputs, sample, values)
    return observers


def _observe_sample(shared: ShardInputs, observers: dict, outputs: list, sample: dict, values: list) -> None:
    """Count a sample (its inputs, and ``values``: its ``outputs``) into ``observers``."""
    for name in shared.counted:
        if name in shared.inputs:
            # Left out of the sample: the model's default feeds it.
            observers[name].update(sample[name] if name in sample else shared.input_defaults[name], shared.values)
    for name, value in zip(outputs, values):
        observers[name].update(value, shared.values)


# --- observers derived instead of counted ----------------------------------------------------------

_SAME_VALUES = ("Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose")
_POWER_OF_TWO_NEAREST = {("asymmetric", "floor"), ("half_pixel", "round_prefer_floor"),
                         ("half_pixel", "round_prefer_ceil"), ("pytorch_half_pixel", "round_prefer_floor"),
                         ("pytorch_half_pixel", "round_prefer_ceil")}


def _nearest_upsampling_repetitions(node) -> int | None:
    """prod(f) when a nearest Resize enlarges every axis by a power of two f and sends output index o to
    input index o // f: asymmetric + floor gives floor(o / f), half_pixel gives round((o + 0.5) / f - 0.5),
    which is within (f - 1) / 2f < 0.5 of o // f, so no tie rule matters. With powers of two, onnxruntime's
    float arithmetic on these coordinates is exact."""
    attrs = node.attrs
    mode = (attrs.get("coordinate_transformation_mode", "half_pixel"), attrs.get("nearest_mode", "round_prefer_floor"))
    if (attrs.get("mode", "nearest") != "nearest" or mode not in _POWER_OF_TWO_NEAREST or len(node.inputs) < 3
            or "axes" in attrs or attrs.get("keep_aspect_ratio_policy", "stretch") != "stretch"):
        return None
    source, result = node.inputs[0].shape, node.outputs[0].shape
    if not source or not result or len(source) != len(result) or not all(
            isinstance(d, int) and d > 0 for d in list(source) + list(result)):
        return None
    factors = [out // dim for dim, out in zip(source, result)]
    if any(out != dim * f or f & (f - 1) for dim, out, f in zip(source, result, factors)):
        return None
    scales = const_value(node.inputs[2]) if node.inputs[2].name else np.zeros(0)  # no name: sizes give the shape
    if scales is None or (scales.size and not np.array_equal(scales, np.asarray(factors, dtype=scales.dtype))):
        return None
    return math.prod(factors)


# op -> how many times its output holds each value of its first input (None: not a known multiple)
REPETITIONS = {op: (lambda node: 1) for op in _SAME_VALUES} | {"Resize": _nearest_upsampling_repetitions}


def derived_tensors(module: Module, tensors: list[str]) -> dict[str, tuple[str, int]]:
    """{tensor: (counted tensor, times)} for the ``tensors`` whose values are exactly another counted tensor's
    of this run, each repeated ``times`` times (REPETITIONS, followed through chains)."""
    wanted = set(tensors)
    derived = {}
    for node in module.graph.nodes:
        if node.op not in REPETITIONS or len(node.outputs) != 1 or not node.inputs:
            continue
        source, result = node.inputs[0], node.outputs[0]
        if (result.name not in wanted or source.name not in wanted or len(result.inputs) != 1
                or source.dtype != result.dtype):
            continue
        times = REPETITIONS[node.op](node)
        if times:
            derived[result.name] = (source.name, times)
    for name, (source, times) in derived.items():  # a derived source: go back to the tensor it comes from
        while source in derived:
            source, more = derived[source]
            times *= more
        derived[name] = (source, times)
    return derived


@dataclass
class CalibrationStats:
    """Statistics cached in ``module.cache[CACHE_KEY]``; valid while graph and data are unchanged."""
    fingerprint: str
    data_key: object
    method: str  # "minmax" (min/max only) or "histogram" (serves every method)
    bins: int
    samples: int
    observers: dict = field(default_factory=dict)

    def serves(self, method: str, bins: int) -> bool:
        if method == "minmax":
            return True  # histograms track the exact min and max too
        return self.method == "histogram" and self.bins == bins


CACHE_KEY = "calibration"


def graph_fingerprint(module: Module) -> str:
    """A digest of the graph's nodes (order-independent) and constant values: statistics are stale when it changes."""
    parts = [f"in {t.name} {t.shape}" for t in module.graph.inputs]
    for node in module.graph.nodes:
        node_digest = hashlib.sha256(f"{node.op} {node.domain} {[t.name for t in node.inputs]} "
                                     f"{[t.name for t in node.outputs]}".encode())
        for key in sorted(node.attrs):
            value = node.attrs[key]
            node_digest.update(key.encode())
            node_digest.update(np.ascontiguousarray(value.values).tobytes() if hasattr(value, "values") else repr(value).encode())
        for tensor in node.inputs:
            value = const_value(tensor)
            if value is not None:
                node_digest.update(np.ascontiguousarray(value).tobytes())
        parts.append(node_digest.hexdigest())
    return hashlib.sha256("\n".join(sorted(parts)).encode()).hexdigest()


def data_key(data) -> object:
    return getattr(data, "key", None) or ("object", id(data), len(data) if hasattr(data, "__len__") else None)


def statistics(module: Module, data, tensors: list[str], method: str, bins: int = 2048, runner=None) -> CalibrationStats:
    """Cached statistics for ``tensors``; runs the model only for tensors the cache lacks."""
    fingerprint, key = graph_fingerprint(module), data_key(data)
    cached = module.cache.get(CACHE_KEY)
    if not (isinstance(cached, CalibrationStats) and cached.fingerprint == fingerprint and cached.data_key == key
            and cached.serves(method, bins)):
        cached = CalibrationStats(fingerprint, key, "minmax" if method == "minmax" else "histogram", bins, 0)
        module.cache[CACHE_KEY] = cached
    missing = [name for name in tensors if name not in cached.observers]
    if missing:
        observers, count = collect(module, data, missing, cached.method, bins, runner=runner)
        cached.observers.update(observers)
        cached.samples = count
    return cached


def encoding_from_observer(observer: MinMaxObserver, method: str, bw: int, percentile: float = 99.99):
    return activation_encoding(*observer.range(method, percentile=percentile, bw=bw), bw)


# --- per-tensor method choice (calibrate{method=auto}) --------------------------------------------

AUTO = "auto"
AUTO_CANDIDATES = ("minmax", "percentile", "mse")
_SUBDIVISIONS = 8  # evaluation points per histogram bin


def histogram_sqnr(observer: HistogramObserver, enc) -> float:
    """SQNR in dB of quantizing the observed values with ``enc``: each bin's count spread evenly over
    ``_SUBDIVISIONS`` points of the bin, so rounding inside a bin and clipping beyond the range both count."""
    points = observer._edges()[:-1, None] + (np.arange(_SUBDIVISIONS) + 0.5) / _SUBDIVISIONS * observer.width
    weights = np.repeat(observer.counts[:, None], _SUBDIVISIONS, axis=1)
    signal = float(np.sum(weights * points * points))
    noise = float(np.sum(weights * np.square(points - fake_quantize(points, enc))))
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(max(signal, 1e-300) / noise)


def choose_encoding(observer: MinMaxObserver, bw: int, percentile: float = 99.99) -> tuple[str, object, float]:
    """(method, encoding, SQNR dB) of the candidate method whose encoding quantizes the observed values
    best; min-max wins ties (and is the only choice without a histogram)."""
    if not isinstance(observer, HistogramObserver) or observer.empty:
        return "minmax", encoding_from_observer(observer, "minmax", bw), math.nan
    best = None
    for method in AUTO_CANDIDATES:
        enc = encoding_from_observer(observer, method, bw, percentile)
        sqnr = histogram_sqnr(observer, enc)
        if best is None or sqnr > best[2]:
            best = (method, enc, sqnr)
    return best
