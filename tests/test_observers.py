"""Observers against direct numpy computations on all the data they streamed."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zenith_onnx import kernels, observers
from zenith_onnx.observers import (
    ENTROPY_BINS,
    EntropyObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MSEObserver,
    NonFiniteValuesError,
    PercentileObserver,
    StreamingHistogram,
    _entropy_threshold_bins,
    observer_for,
)

ALL_METHODS = ("minmax", "moving_average", "percentile", "entropy", "mse")
HISTOGRAM_METHODS = ("percentile", "entropy", "mse")


@pytest.fixture(autouse=True, params=["native", "numpy"])
def binning(request, monkeypatch):
    """Every test runs with the compiled counting loop and with the numpy fallback."""
    if request.param == "numpy":
        monkeypatch.setattr(observers, "_native", None)
    elif observers._native is None:
        pytest.skip("zenith_onnx._native was not built (no C compiler): numpy binning only")
    return request.param


def _widening_batches(seed: int = 0) -> list[np.ndarray]:
    """Batches whose range grows by 30x on both sides after the first one."""
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(50_000) * s + shift).astype(np.float32) for s, shift in
            ((0.1, 0.0), (0.5, 0.3), (1.0, -0.5), (3.0, 1.0))]


def _gaussian_with_outliers(n: int = 4_000_000, seed: int = 0, outlier: float = 1000.0) -> list[np.ndarray]:
    """N(0, 1) with one outlier on each side. (The MSE optimum depends on how rare the
    outliers are: N * step**2 / 12 against each outlier's squared clipping error.)"""
    x = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    x[[10, n // 2]] = [outlier, -outlier]
    return np.split(x, 40)


def test_minmax_equals_numpy_over_four_samples():
    rng = np.random.default_rng(1)
    samples = [rng.standard_normal((1, 8, 5, 5)).astype(np.float32) * (i + 1) for i in range(4)]
    obs = MinMaxObserver()
    for s in samples:
        obs.observe(s)
    data = np.concatenate([s.ravel() for s in samples])
    assert obs.compute_range() == (float(data.min()), float(data.max()))
    assert obs.count == data.size


def test_moving_average_equals_direct_ema():
    batches = _widening_batches()
    obs = MovingAverageMinMaxObserver(averaging_constant=0.1)
    for b in batches:
        obs.observe(b)
    lo, hi = float(batches[0].min()), float(batches[0].max())
    for b in batches[1:]:
        lo += 0.1 * (float(b.min()) - lo)
        hi += 0.1 * (float(b.max()) - hi)
    assert obs.compute_range() == pytest.approx((lo, hi), rel=1e-12)


@pytest.mark.parametrize("percentile", [99.0, 99.9, 99.99])
def test_percentile_per_side_within_one_bin_when_range_widens(percentile):
    batches = _widening_batches()
    obs = PercentileObserver(percentile)
    for b in batches:
        obs.observe(b)
    data = np.concatenate(batches).astype(np.float64)
    expected = (np.percentile(data, 100 - percentile), np.percentile(data, percentile))
    assert obs.bin_width > 0
    # the range grew ~30x after the first batch: the histogram was coarsened several times
    assert obs.bin_width > 16 * (batches[0].max() - batches[0].min()) / obs.histogram.bins
    lo, hi = obs.compute_range()
    assert abs(lo - expected[0]) <= obs.bin_width
    assert abs(hi - expected[1]) <= obs.bin_width


def test_percentile_symmetric_within_one_bin():
    batches = _widening_batches(3)
    obs = PercentileObserver(99.9, symmetric=True)
    for b in batches:
        obs.observe(b)
    data = np.concatenate(batches).astype(np.float64)
    t = np.percentile(np.abs(data), 99.9)
    lo, hi = obs.compute_range()
    assert lo == -hi or lo == pytest.approx(data.min())
    assert abs(hi - t) <= obs.bin_width


def test_percentile_one_sided_growth_to_the_right():
    rng = np.random.default_rng(5)
    batches = [np.abs(rng.standard_normal(20_000)).astype(np.float32) * s for s in (1, 10, 100)]
    obs = PercentileObserver(99.5)
    for b in batches:
        obs.observe(b)
    data = np.concatenate(batches).astype(np.float64)
    lo, hi = obs.compute_range()
    assert abs(hi - np.percentile(data, 99.5)) <= obs.bin_width
    assert abs(lo - np.percentile(data, 0.5)) <= obs.bin_width


def test_percentile_100_is_minmax():
    batches = _widening_batches()
    obs = PercentileObserver(100.0)
    for b in batches:
        obs.observe(b)
    data = np.concatenate(batches)
    assert obs.compute_range() == (float(data.min()), float(data.max()))


@settings(max_examples=40, deadline=None)
@given(
    scales=st.lists(st.floats(1e-3, 1e3), min_size=1, max_size=6),
    shifts=st.lists(st.floats(-50, 50), min_size=6, max_size=6),
    bins=st.sampled_from([16, 64, 4096]),
)
def test_streamed_histogram_equals_numpy_histogram_on_final_edges(scales, shifts, bins):
    rng = np.random.default_rng(len(scales))
    batches = [(rng.standard_normal(2000) * s + shifts[i]).astype(np.float32) for i, s in enumerate(scales)]
    hist = StreamingHistogram(bins)
    for b in batches:
        hist.add(b, float(b.min()), float(b.max()))
    data = np.concatenate(batches).astype(np.float64)
    assert hist.counts.sum() == data.size
    edges = (hist.start + np.arange(bins + 1)) * hist.width
    assert edges[0] <= data.min() and data.max() < edges[-1] + hist.width * 1e-6
    expected, _ = np.histogram(data, bins=edges)
    # Exact but for values within float32 rounding of an edge (binning runs in float32:
    # (x - origin) / w with |x| + |origin| setting the rounding error).
    position = (data - edges[0]) / hist.width
    rounding = 4e-7 * (np.abs(data) + abs(edges[0])) / hist.width + 1e-9
    ambiguous = int(np.sum(np.abs(position - np.round(position)) < rounding))
    assert np.abs(hist.counts - expected).sum() <= 2 * ambiguous
    # the window holds the data in at least half of its bins after any growth
    first, last = np.flatnonzero(hist.counts)[[0, -1]]
    assert last - first + 1 >= bins // 2 - 2 or len(batches) == 1


@pytest.mark.parametrize("dtype, base, spread", [
    (np.float32, 3.0, 2.4e-6),  # ten float32 ulps at 3.0: found on a real model's activation
    (np.float32, -1e4, 0.5),
    (np.float64, 1e8, 1e-6),  # too narrow even for float64 arithmetic at 1e8: indices clipped
])
@pytest.mark.parametrize("method", HISTOGRAM_METHODS)
def test_narrow_band_far_from_zero(method, dtype, base, spread):
    # The bins are far narrower than the values' float32 spacing; binning in float32
    # would shift indices by hundreds of bins (an IndexError before the fix).
    rng = np.random.default_rng(3)
    batches = [(base + rng.random(30_000) * spread * (1 + k)).astype(dtype) for k in range(3)]
    obs = observer_for(method, percentile=99.0)
    for b in batches:
        obs.observe(b)
    data = np.concatenate(batches).astype(np.float64)
    assert obs.histogram.counts.sum() == data.size
    lo, hi = obs.compute_range()
    assert data.min() <= lo <= hi <= data.max()
    if method == "percentile":
        tolerance = obs.bin_width if dtype == np.float32 else 4 * np.spacing(base)
        assert abs(hi - np.percentile(data, 99.0)) <= tolerance
        assert abs(lo - np.percentile(data, 1.0)) <= tolerance


def test_histogram_constant_batches_then_spread():
    obs = PercentileObserver(90.0)
    obs.observe(np.full(1000, 2.5, np.float32))
    assert obs.compute_range() == (2.5, 2.5)  # no width yet: a point mass
    obs.observe(np.linspace(0, 1, 1000, dtype=np.float32))
    data = np.concatenate([np.full(1000, 2.5), np.linspace(0, 1, 1000, dtype=np.float32)])
    assert obs.histogram.counts.sum() == 2000
    lo, hi = obs.compute_range()
    assert abs(hi - np.percentile(data, 90)) <= obs.bin_width
    assert abs(lo - np.percentile(data, 10)) <= obs.bin_width


def _kl_direct(h: np.ndarray, levels: int, eps: float = 1e-4) -> int:
    """The KL threshold search written out per candidate (onnxruntime's and MXNet's loop:
    levels of ``i // levels`` bins, the last one taking the remainder; with the
    empty-last-bin smoothing)."""
    h = h.astype(np.float64)
    best, best_kl = h.size, math.inf
    for i in range(levels, h.size + 1):
        p = h[:i].copy()
        p[-1] += h[i:].sum()
        width = i // levels
        q = np.zeros(i)
        for g in range(levels):
            members = slice(g * width, (g + 1) * width if g < levels - 1 else i)
            nonempty = h[members] > 0
            if nonempty.any():
                q[members] = np.where(nonempty, h[members].sum() / nonempty.sum(), 0.0)
        if q[-1] == 0 and p[-1] > 0:
            q[-1] = eps
        if q.sum() == 0:
            continue
        pn, qn = p / p.sum(), q / q.sum()
        mask = pn > 0
        kl = float(np.sum(pn[mask] * np.log(pn[mask] / qn[mask])))
        if kl < best_kl - 1e-12:
            best, best_kl = i, kl
    return best


@pytest.mark.parametrize("seed", range(4))
def test_entropy_search_equals_direct_kl_loop(seed):
    rng = np.random.default_rng(seed)
    data = np.abs(rng.standard_t(3, 20_000))
    h, _ = np.histogram(data, bins=300)
    h[rng.integers(0, 300, 20)] = 0  # empty bins inside the range
    levels = 16
    assert _entropy_threshold_bins(h, levels) == _kl_direct(h, levels)


@pytest.mark.parametrize("bins", [1100, 700, 129])
def test_entropy_search_equals_direct_kl_loop_for_many_level_widths(bins):
    # 1100 bins into 16 levels: 68 level widths, each shared by 16 candidates; 129 bins
    # into 128 levels: only the last level can be wider than one bin.
    rng = np.random.default_rng(7)
    h, _ = np.histogram(np.abs(rng.standard_t(3, 50_000)), bins=bins)
    levels = 128 if bins == 129 else 16
    assert _entropy_threshold_bins(h, levels) == _kl_direct(h, levels)


def test_entropy_clips_huge_outliers():
    obs = EntropyObserver(bits=8)
    for b in _gaussian_with_outliers():
        obs.observe(b)
    lo, hi = obs.compute_range()
    assert lo == -hi
    assert 3.0 < hi < 1000.0 / 5


def test_entropy_one_sided_after_relu_uses_256_levels():
    rng = np.random.default_rng(2)
    x = np.maximum(rng.standard_normal(1_000_000), 0).astype(np.float32)
    x[123] = 200.0
    obs = EntropyObserver(bits=8)
    obs.observe(x)
    lo, hi = obs.compute_range()
    assert lo == 0.0
    assert 3.0 < hi < 50.0
    folded, width = obs._abs_histogram(ENTROPY_BINS)
    assert hi == pytest.approx(_entropy_threshold_bins(folded, 256) * width)


def test_entropy_on_plain_gaussian_keeps_the_bulk():
    x = np.random.default_rng(4).standard_normal(1_000_000).astype(np.float32)
    obs = EntropyObserver()
    obs.observe(x)
    lo, hi = obs.compute_range()
    assert 3.0 < hi <= float(np.abs(x).max())


def test_entropy_with_16_bits_keeps_full_range():
    x = np.random.default_rng(4).standard_normal(100_000).astype(np.float32)
    obs = EntropyObserver(bits=16)
    obs.observe(x)
    assert obs.compute_range() == (float(x.min()), float(x.max()))


def _true_mse(data: np.ndarray, lo: float, hi: float, bits: int = 8) -> float:
    """Mean squared error of asymmetric uint quantization of all the data on [lo, hi]."""
    qrange = kernels.int_range(bits, signed=False)
    scale, zp = kernels.scale_zero_point(lo, hi, qrange, symmetric=False)
    return float(np.mean((kernels.fake_quantize(data, scale, zp, qrange) - data) ** 2))


def test_mse_clips_huge_outliers():
    obs = MSEObserver(bits=8)
    batches = _gaussian_with_outliers()
    for b in batches:
        obs.observe(b)
    lo, hi = obs.compute_range()
    assert 3.0 < hi < 1000.0 / 5 and -1000.0 / 5 < lo < -3.0


def test_mse_range_is_near_the_best_range_on_all_data():
    batches = _gaussian_with_outliers(n=1_000_000, outlier=50.0)
    data = np.concatenate(batches)
    obs = MSEObserver(bits=8)
    for b in batches:
        obs.observe(b)
    lo, hi = obs.compute_range()
    ours = _true_mse(data, lo, hi)
    grid = min(_true_mse(data, -t, t) for t in np.geomspace(2.0, 50.0, 30))
    assert ours <= 1.1 * grid
    assert ours < _true_mse(data, float(data.min()), float(data.max()))


@pytest.mark.parametrize("method", ALL_METHODS)
def test_state_size_does_not_depend_on_sample_count(method):
    rng = np.random.default_rng(0)

    def state_after(n_batches: int) -> int:
        obs = observer_for(method)
        for i in range(n_batches):
            obs.observe(rng.standard_normal(1000).astype(np.float32) * (1 + i % 7))
        obs.compute_range()
        return len(pickle.dumps(obs))

    assert state_after(1000) <= state_after(10) + 64


@pytest.mark.parametrize("method", ALL_METHODS)
def test_non_finite_values_are_refused(method):
    obs = observer_for(method)
    obs.observe(np.ones(4, np.float32))
    with pytest.raises(NonFiniteValuesError, match="NaN"):
        obs.observe(np.array([1.0, np.nan], np.float32))
    with pytest.raises(NonFiniteValuesError, match="Inf"):
        obs.observe(np.array([1.0, -np.inf], np.float32))
    assert obs.count == 4


@pytest.mark.parametrize("method", ALL_METHODS)
def test_empty_observer(method):
    obs = observer_for(method)
    obs.observe(np.zeros((0, 3), np.float32))
    assert obs.count == 0
    with pytest.raises(ValueError, match="no data"):
        obs.compute_range()


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("dtype", [np.float16, np.float64, np.int32])
def test_other_dtypes(method, dtype):
    x = (np.arange(-50, 51) * 2).astype(dtype)
    obs = observer_for(method)
    obs.observe(x)
    lo, hi = obs.compute_range()
    assert -100.0 <= lo < 0.0 < hi <= 100.0


@pytest.mark.parametrize("method", ALL_METHODS)
def test_results_stay_inside_observed_range(method):
    obs = observer_for(method)
    for b in _widening_batches(7):
        obs.observe(b)
    lo, hi = obs.compute_range()
    assert obs.min <= lo < hi <= obs.max


def test_observer_for():
    assert type(observer_for("minmax")) is MinMaxObserver
    assert type(observer_for("moving_average")) is MovingAverageMinMaxObserver
    p = observer_for("percentile", percentile=99.0, symmetric=True)
    assert isinstance(p, PercentileObserver) and p.percentile == 99.0 and p.symmetric
    assert observer_for("entropy", bits=16).bits == 16
    assert observer_for("mse", bins=256).histogram.bins == 256
    with pytest.raises(ValueError, match="unknown calibration method"):
        observer_for("kl")
    with pytest.raises(ValueError):
        PercentileObserver(20.0)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_relu_derivation_matches_observing_the_relu_output(method):
    batches = _widening_batches(11)
    derived_from = observer_for(method, percentile=99.0)
    direct = observer_for(method, percentile=99.0)
    for b in batches:
        derived_from.observe(b)
        direct.observe(np.maximum(b, 0))
    derived = derived_from.relu()
    relu_data = np.maximum(np.concatenate(batches), 0).astype(np.float64)
    assert derived.count == direct.count == relu_data.size
    assert (derived.min, derived.max) == (direct.min, direct.max) == (0.0, float(relu_data.max()))
    lo, hi = derived.compute_range()
    if method in ("minmax", "moving_average"):
        assert (lo, hi) == direct.compute_range()
    elif method == "percentile":
        assert abs(lo - np.percentile(relu_data, 1.0)) <= derived.bin_width
        assert abs(hi - np.percentile(relu_data, 99.0)) <= derived.bin_width
    else:  # the same search on a histogram of the same values (a coarser window)
        d_lo, d_hi = direct.compute_range()
        # MSE moves by under 5%; entropy, whose levels of i // L bins favour thresholds
        # near multiples of L bins, by a median 7% and up to 27% over 40 such seeds.
        assert lo == d_lo == 0.0 and abs(hi - d_hi) <= (0.05 if method == "mse" else 0.3) * d_hi
    assert derived_from.compute_range()[0] < 0  # the source is untouched


def test_moving_average_relu_is_exact_when_batches_sit_on_either_side_of_zero():
    # Batches wholly above 0, wholly below and across: clamped extremes differ from the
    # clamped averages on both ends, so a clamp of the averages would fail here.
    rng = np.random.default_rng(5)
    batches = [(rng.standard_normal(100) * 0.1 + shift).astype(np.float32) for shift in (-1.0, 0.5, 2.0, -3.0, 0.0, 1.0)]
    source, direct = MovingAverageMinMaxObserver(0.3), MovingAverageMinMaxObserver(0.3)
    for b in batches:
        source.observe(b)
        direct.observe(np.maximum(b, 0))
    derived = source.relu()
    assert derived.compute_range() == direct.compute_range()
    assert derived.compute_range() != tuple(max(v, 0.0) for v in source.compute_range())
    assert derived.relu().compute_range() == direct.compute_range()


def test_relu_histogram_is_exact():
    batches = _widening_batches(12)
    hist = StreamingHistogram(256)
    for b in batches:
        hist.add(b, float(b.min()), float(b.max()))
    relu = hist.relu()
    data = np.maximum(np.concatenate(batches), 0).astype(np.float64)
    edges = (relu.start + np.arange(257)) * relu.width
    expected, _ = np.histogram(data, bins=edges)
    assert np.abs(relu.counts - expected).sum() <= 4
    assert relu.counts[: -relu.start].sum() == 0 and relu.counts[-relu.start] >= np.sum(data == 0)


def test_relu_of_negative_and_constant_data():
    obs = observer_for("percentile")
    obs.observe(np.linspace(-5, -1, 1000, dtype=np.float32))
    assert obs.relu().compute_range() == (0.0, 0.0)
    point = observer_for("mse")
    point.observe(np.full(10, -3.0, np.float32))
    assert point.relu().compute_range() == (0.0, 0.0) and point.relu().count == 10


def test_entropy_is_not_pulled_down_by_the_zeros_of_a_relu():
    x = np.maximum(np.random.default_rng(8).standard_normal(1_000_000), 0).astype(np.float32)
    obs = EntropyObserver()
    obs.observe(x)
    lo, hi = obs.compute_range()
    assert lo == 0.0 and 3.0 < hi <= float(x.max())

