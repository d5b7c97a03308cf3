"""Streaming range observers for activation calibration.

An observer sees a tensor one batch at a time (`observe`) and, when the data is
exhausted, turns what it kept into a ``(min, max)`` range (`compute_range`). The two
steps are kept apart so the expensive search of the histogram methods runs once.

No observer keeps a sample. The histogram observers keep one fixed-size histogram
(`StreamingHistogram`): ``bins`` counters whose edges sit on the integer multiples of a
bin width ``w``. When a batch falls outside the window, the window slides, or ``w`` is
doubled as many times as needed and each run of ``2**d`` old bins is merged into one
new bin. Because the edges are multiples of ``w`` (zero is always an edge), the merge is
exact: every count lands in the bin that holds its old bin, nothing is interpolated.
The data range therefore always fills between ``bins/2`` and ``bins`` counters.
Counting a float32 batch is a compiled loop (`zenith_onnx/_native.c`, built by setup.py
when a C compiler is there: 0.55 ns per value, in double, the GIL released) or else
numpy (``np.add.at``, 1.1 ns per value, float32 where that resolves the bins).

Methods (``compute_range``):

- minmax: the exact smallest and largest value seen.
- moving_average: exponential moving average of each batch's min and max,
  ``m <- m + c (batch_min - m)`` (PyTorch's MovingAverageMinMaxObserver, c = 0.01).
- percentile: the ``p``-th percentile on each side (``100 - p`` and ``p``), or with
  ``symmetric=True`` the ``p``-th percentile of ``|x|`` as ``(-t, t)``; linear
  interpolation inside the bin, so the result is within one bin of ``np.percentile``.
- entropy: TensorRT's KL-divergence threshold search. The ``|x|`` histogram (at most
  `ENTROPY_BINS` = 2048 bins) is cut at every candidate bin edge ``i``; the reference distribution P
  is the first ``i`` bins with the clipped mass added to the last one, the candidate Q
  merges those ``i`` bins into ``L`` levels of ``i // L`` bins, the last level also taking
  the remainder (the grouping of TensorRT's reference search, MXNet and onnxruntime), and
  spreads each level over its non-empty bins; the threshold minimizes KL(P || Q) (an
  empty last bin gets q = 1e-4 counts, the epsilon smoothing of MXNet and onnxruntime,
  so that a sparse tail can be cut; the first bin, where exact zeros pile up, counts as
  much as the second, as in pytorch-quantization). ``L = 2**(bits - 1)`` (128 for int8)
  for signed data, ``2**bits`` (256) for data that never goes below zero (after ReLU).
  All candidates are evaluated at once from prefix sums: with ``S_g`` the count and
  ``n_g`` the non-empty bins of level ``g``,
  ``sum_j p_j log(p_j / q_j) = sum_{j < i} h_j log h_j - sum_g S_g log(S_g / n_g)``
  plus the correction of the last bin, and the candidates with the same ``i // L`` share
  all levels but the last, so a search costs about 0.1 ms. (pytorch-quantization's
  balanced levels, ``ceil(g i / L)``, share nothing: O(L) per candidate, 1-2 ms per
  search, most of the calibration time of small models; quantizing the real models of
  `bench/zoo.py` with them gave 0.5-1.9 dB lower SQNR on three and the same on layout.)
- mse: the range ``[a, b]`` (bin edges, ``a <= 0 <= b``) that minimizes the expected
  squared error of ``2**bits`` level asymmetric quantization,
  ``N_in * ((b - a) / (2**bits - 1))**2 / 12 + sum_{x < a} (a - x)**2 + sum_{x > b} (x - b)**2``,
  the clipped terms from the bin centres (plus ``w**2 / 12`` per value for the spread
  inside a bin), by alternating exact scans over ``b`` and over ``a`` (prefix sums).

All histogram results are clamped to the observed ``[min, max]`` (both bounds).

`Observer.relu` derives the state of ``max(x, 0)`` from the state of ``x`` (exact for the
histogram: 0 is an edge, the negative mass moves to the bin ``[0, w)``; moving_average
keeps the averages of the batch extremes clamped at 0 beside its own), so calibration
need not bin a ReLU output whose input it already bins. The derived histogram keeps the
input's bin width; the entropy threshold, which moves with the bin width (its levels of
``i // L`` bins favour thresholds near multiples of ``L`` bins), then differs from a
direct observation about as much as it does between two growth histories (a median 7%
on widening Gaussian batches).
"""

from __future__ import annotations

import abc
import copy
import logging
import math

import numpy as np

__all__ = [
    "NonFiniteValuesError",
    "Observer",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "StreamingHistogram",
    "HistogramObserver",
    "PercentileObserver",
    "EntropyObserver",
    "MSEObserver",
    "observer_for",
    "DEFAULT_BINS",
    "ENTROPY_BINS",
]

logger = logging.getLogger(__name__)

try:  # the compiled counting loop that setup.py builds when a C compiler is there
    from zenith_onnx import _native
except ImportError:  # numpy: the same counts up to float32 rounding at bin edges, twice the time
    _native = None

# 4096 signed bins leave about 2048 bins of |x| for data centred on zero (TensorRT
# searches 2048 bins) and 4096 for one-sided data; 32 KB of counters per tensor.
DEFAULT_BINS = 4096
# Bins of |x| the entropy search runs on (TensorRT: 2048 bins into 128 levels).
ENTROPY_BINS = 2048
# q (in counts) given to an empty last bin that receives clipped mass in the KL search.
_EMPTY_BIN_Q = 1e-4


class NonFiniteValuesError(ValueError):
    """An observed array holds NaN or +/-Inf (the caller names the tensor)."""


class Observer(abc.ABC):
    """Streaming statistics of one tensor: `observe` batches, then `compute_range`."""

    def __init__(self) -> None:
        self.count = 0  # number of values observed
        self.min = math.inf
        self.max = -math.inf

    def observe(self, array) -> None:
        """Add one batch of values (any shape). Raises `NonFiniteValuesError` on NaN/Inf."""
        x = np.asarray(array)
        if x.size == 0:
            return
        if x.dtype not in (np.float32, np.float64):
            x = x.astype(np.float64 if x.dtype.itemsize > 4 else np.float32)
        x = x.reshape(-1)
        lo, hi = float(x.min()), float(x.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            kinds = [k for k, bad in (("NaN", np.isnan), ("Inf", np.isinf)) if bool(bad(x).any())]
            raise NonFiniteValuesError(f"{' and '.join(kinds)} values")
        self.count += x.size
        self.min = min(self.min, lo)
        self.max = max(self.max, hi)
        self._update(x, lo, hi)

    def _update(self, x: np.ndarray, lo: float, hi: float) -> None:
        """Method-specific state update for a finite, flat, non-empty batch."""

    @abc.abstractmethod
    def compute_range(self) -> tuple[float, float]:
        """The calibrated ``(min, max)``; raises ValueError if nothing was observed."""

    def _require_data(self) -> None:
        if self.count == 0:
            raise ValueError(f"{type(self).__name__}: no data observed")

    def relu(self) -> Observer:
        """An observer in the state this one would have after observing ``max(x, 0)``
        of every batch instead of ``x``."""
        derived = copy.copy(self)
        derived.min, derived.max = max(self.min, 0.0), max(self.max, 0.0)
        return derived


class MinMaxObserver(Observer):
    """The exact minimum and maximum over every value seen."""

    def compute_range(self) -> tuple[float, float]:
        self._require_data()
        return self.min, self.max


class MovingAverageMinMaxObserver(Observer):
    """Exponential moving average of the per-batch minimum and maximum."""

    def __init__(self, averaging_constant: float = 0.01) -> None:
        super().__init__()
        if not 0.0 < averaging_constant <= 1.0:
            raise ValueError(f"averaging_constant must be in (0, 1], got {averaging_constant}")
        self.averaging_constant = averaging_constant
        self.avg_min: float | None = None
        self.avg_max: float | None = None
        # The averages ``max(x, 0)`` would have: batch extremes clamped at 0 (`relu`).
        self.relu_avg_min: float | None = None
        self.relu_avg_max: float | None = None

    def _update(self, x: np.ndarray, lo: float, hi: float) -> None:
        relu_lo, relu_hi = max(lo, 0.0), max(hi, 0.0)
        if self.avg_min is None:
            self.avg_min, self.avg_max = lo, hi
            self.relu_avg_min, self.relu_avg_max = relu_lo, relu_hi
            return
        c = self.averaging_constant
        self.avg_min += c * (lo - self.avg_min)
        self.avg_max += c * (hi - self.avg_max)
        self.relu_avg_min += c * (relu_lo - self.relu_avg_min)
        self.relu_avg_max += c * (relu_hi - self.relu_avg_max)

    def compute_range(self) -> tuple[float, float]:
        self._require_data()
        return float(self.avg_min), float(self.avg_max)

    def relu(self) -> MovingAverageMinMaxObserver:
        # An average of clamped batch extremes is not the clamped average: kept apart.
        derived = super().relu()
        derived.avg_min, derived.avg_max = self.relu_avg_min, self.relu_avg_max
        return derived


class StreamingHistogram:
    """A fixed number of bins over a window that slides and coarsens as data arrives.

    Bin ``j`` covers ``[(start + j) w, (start + j + 1) w)``. Until a batch with two
    different values arrives there is no width; the constant seen so far is kept as
    one value and its count.
    """

    def __init__(self, bins: int = DEFAULT_BINS) -> None:
        if bins < 16:
            raise ValueError(f"a histogram needs at least 16 bins, got {bins}")
        self.bins = bins
        # The counts plus one spare slot that catches index ``bins`` (see `_mapping`).
        self._slots: np.ndarray | None = None
        self.width = 0.0
        self.start = 0
        self.lo = math.inf  # extremes of everything added
        self.hi = -math.inf
        self._point_value: float | None = None
        self._point_count = 0
        self._cached = None

    def add(self, x: np.ndarray, lo: float, hi: float) -> None:
        """Count the flat finite array ``x`` whose extremes are ``lo`` and ``hi``."""
        lo, hi = min(lo, self.lo), max(hi, self.hi)
        self.lo, self.hi = lo, hi
        if self.counts is None:
            if lo == hi:
                self._point_value = lo
                self._point_count += x.size
                return
            self._open(lo, hi)
        else:
            self._cover(lo, hi)
        slots = self._slots
        if _native is not None and x.dtype == np.float32:
            # Compiled: one pass in double (always precise), clipped, the GIL released.
            _native.count(x, slots, self.start * self.width, 1.0 / self.width)
        else:
            # np.add.at counts a third faster than np.bincount (no min/max pass over the
            # indices, no temporary histogram) and binning is where these observers spend
            # their time.
            np.add.at(slots, self._indices(x), 1)
        slots[-2] += slots[-1]
        slots[-1] = 0

    def _indices(self, x: np.ndarray) -> np.ndarray:
        """Slot of every value of ``x`` with numpy (0 .. ``bins``, see `_mapping`)."""
        origin, inverse, precise = self._mapping(x.dtype)
        if not precise and x.dtype != np.float64:
            x = x.astype(np.float64)  # float32 cannot place the values to a bin
            origin, inverse, precise = self._mapping(x.dtype)
        scaled = x - origin
        scaled *= inverse
        index = scaled.astype(np.intp)
        if not precise:  # values so far from 0 that even float64 blurs the bins: clip
            np.clip(index, 0, self.bins, out=index)
        return index

    @property
    def counts(self) -> np.ndarray | None:
        """Counts of the ``bins`` bins (None while there is no width)."""
        return None if self._slots is None else self._slots[: self.bins]

    @counts.setter
    def counts(self, counts: np.ndarray | None) -> None:
        if counts is None:
            self._slots = None
        else:
            self._slots = np.zeros(self.bins + 1, dtype=np.int64)
            self._slots[: self.bins] = counts

    def _mapping(self, dtype: np.dtype) -> tuple[np.generic, np.generic, bool]:
        """``(origin, 1 / width, precise)`` in ``dtype``, cached until the window changes.
        The origin is rounded down, so ``x - origin >= 0`` exactly and the truncating cast
        is a floor. ``precise``: ``dtype`` resolves the window's values to a quarter bin, so
        rounding can only push an index one past the last bin, into the spare slot that
        `add` empties into the last bin (no clip pass over the batch). It is not when the
        values sit far from 0 compared with their spread (3.0 to 3.0000024 in 4096 bins
        is 0.0017 float32 ulps per bin), or ``1 / width`` leaves float32's range."""
        key = (dtype, self.start, self.width)
        if self._cached is None or self._cached[0] != key:
            origin = dtype.type(self.start * self.width)
            if float(origin) > self.start * self.width:
                origin = np.nextafter(origin, dtype.type(-np.inf))
            edge = max(abs(self.start), abs(self.start + self.bins)) * self.width
            fits = dtype == np.float64 or 1e-30 < self.width < 1e30
            precise = fits and bool(4.0 * float(np.spacing(dtype.type(edge))) <= self.width)
            inverse = dtype.type(1.0 / self.width) if fits else None
            self._cached = (key, origin, inverse, precise)
        return self._cached[1:]

    def _open(self, lo: float, hi: float) -> None:
        # Two bins of slack: floor(lo / w) and floor(hi / w) may straddle one more edge.
        self.width = (hi - lo) / (self.bins - 2)
        self.start = math.floor(lo / self.width)
        self._cover(lo, hi)  # absorbs rounding in the floor above
        self.counts = np.zeros(self.bins, dtype=np.int64)
        if self._point_count:
            k = math.floor(self._point_value / self.width) - self.start
            self.counts[min(max(k, 0), self.bins - 1)] += self._point_count
            self._point_count = 0

    def _cover(self, lo: float, hi: float) -> None:
        """Slide the window and, if it is too narrow, double the width ``shift`` times
        (merging each run of ``2**shift`` bins) so that it holds ``[lo, hi]``."""
        k_lo, k_hi = math.floor(lo / self.width), math.floor(hi / self.width)
        shift = 0
        while (k_hi >> shift) - (k_lo >> shift) + 1 > self.bins:
            shift += 1
        k_lo, k_hi = k_lo >> shift, k_hi >> shift
        new_start = self.start >> shift
        if k_lo < new_start:
            new_start = k_lo
        elif k_hi > new_start + self.bins - 1:
            new_start = k_hi - self.bins + 1
        if shift == 0 and new_start == self.start:
            return
        if self.counts is not None:
            self.counts = _merge_bins(self.counts, self.start, shift, new_start, self.bins)
        self.start = new_start
        self.width *= 2**shift

    def relu(self) -> StreamingHistogram:
        """The histogram of ``max(x, 0)``: the mass of the bins below 0 moves to the bin
        ``[0, w)`` (0 is an edge, so this is exact)."""
        out = copy.copy(self)
        out.lo, out.hi = max(self.lo, 0.0), max(self.hi, 0.0)
        if self.counts is None:
            out._point_value = None if self._point_value is None else max(self._point_value, 0.0)
            return out
        negative = min(max(-self.start, 0), self.bins)  # bins below 0
        if negative == 0:
            out.counts = self.counts.copy()
        elif negative < self.bins:
            out.counts = self.counts.copy()
            out.counts[negative] += out.counts[:negative].sum()
            out.counts[:negative] = 0
        else:  # every value was negative: a point mass at 0
            out.counts, out.width, out.start = None, 0.0, 0
            out._point_value, out._point_count = 0.0, int(self.counts.sum())
        return out

    def with_zero_edge(self, max_bins: int) -> tuple[np.ndarray, float, int]:
        """``(counts, width, zero)``: the histogram extended so that 0 is one of its
        edges (``counts[zero:]`` lie above 0), coarsened by powers of two to at most
        ``max_bins`` bins. Needs at least two distinct values added."""
        first, last = min(self.start, 0), max(self.start + self.bins, 0) - 1
        shift = 0
        while (last >> shift) - (first >> shift) + 1 > max_bins:
            shift += 1
        first_c = first >> shift
        size = (last >> shift) - first_c + 1
        return _merge_bins(self.counts, self.start, shift, first_c, size), self.width * 2**shift, -first_c


def _merge_bins(counts: np.ndarray, start: int, shift: int, new_start: int, size: int) -> np.ndarray:
    """Counts re-indexed from global bins ``start + j`` of width ``w`` to ``size`` bins
    of width ``w * 2**shift`` starting at global bin ``new_start`` (exact: edges nest)."""
    occupied = np.flatnonzero(counts)
    target = ((occupied + start) >> shift) - new_start
    return np.bincount(target, weights=counts[occupied], minlength=size).astype(np.int64)


class HistogramObserver(Observer):
    """Base of the observers that keep a `StreamingHistogram`."""

    def __init__(self, bins: int = DEFAULT_BINS) -> None:
        super().__init__()
        self.histogram = StreamingHistogram(bins)

    def _update(self, x: np.ndarray, lo: float, hi: float) -> None:
        self.histogram.add(x, lo, hi)

    def relu(self) -> HistogramObserver:
        derived = super().relu()
        derived.histogram = self.histogram.relu()
        return derived

    @property
    def bin_width(self) -> float:
        """Current bin width (0 while only one distinct value has been seen)."""
        return self.histogram.width

    def _clamp(self, lo: float, hi: float) -> tuple[float, float]:
        """Both bounds moved into ``[min, max]``: a range the search put wholly below the
        data (entropy's ``(-t, t)`` or MSE's ``[a <= 0, b]`` for data in a narrow band
        above ``t`` or ``b``) becomes ``(min, min)``, never ``lo > hi``."""
        return min(max(lo, self.min), self.max), max(min(hi, self.max), self.min)

    def _abs_histogram(self, max_bins: int | None = None) -> tuple[np.ndarray, float]:
        """Counts of ``|x|`` in bins ``[i w, (i + 1) w)`` (at most ``max_bins``, default
        ``bins``, of them), and ``w``."""
        max_bins = max_bins or self.histogram.bins
        counts, width, zero = self.histogram.with_zero_edge(2 * self.histogram.bins)
        above, below = counts[zero:], counts[:zero][::-1]
        folded = np.zeros(max(above.size, below.size), dtype=np.int64)
        folded[: above.size] += above
        folded[: below.size] += below
        shift = 0
        while ((folded.size - 1) >> shift) + 1 > max_bins:
            shift += 1
        return _merge_bins(folded, 0, shift, 0, ((folded.size - 1) >> shift) + 1), width * 2**shift


def _quantile(counts: np.ndarray, origin: float, width: float, q: float) -> float:
    """The ``q`` quantile of histogram data with ``np.percentile``'s definition (rank
    ``q (n - 1)``), interpolated linearly inside the bin that holds that rank."""
    cumulative = np.cumsum(counts)
    rank = q * (int(cumulative[-1]) - 1)
    below = math.floor(rank)

    def value_at(k: int) -> float:  # the k-th smallest value, placed evenly inside its bin
        j = min(int(np.searchsorted(cumulative, k, side="right")), counts.size - 1)
        before = int(cumulative[j - 1]) if j else 0
        return origin + (j + (k - before + 0.5) / max(int(counts[j]), 1)) * width

    lo = value_at(below)
    return lo + (rank - below) * (value_at(below + 1) - lo) if rank > below else lo


class PercentileObserver(HistogramObserver):
    """Cut ``100 - percentile`` percent of the values on each side (or of ``|x|``)."""

    def __init__(self, percentile: float = 99.99, symmetric: bool = False, bins: int = DEFAULT_BINS) -> None:
        super().__init__(bins)
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile
        self.symmetric = symmetric

    def compute_range(self) -> tuple[float, float]:
        self._require_data()
        q = self.percentile / 100.0
        h = self.histogram
        if q == 1.0 or h.counts is None:
            return self.min, self.max
        if self.symmetric:
            folded, width = self._abs_histogram()
            t = _quantile(folded, 0.0, width, q)
            return self._clamp(-t, t)
        origin = h.start * h.width
        return self._clamp(_quantile(h.counts, origin, h.width, 1.0 - q), _quantile(h.counts, origin, h.width, q))


def _entropy_threshold_bins(h: np.ndarray, levels: int) -> int | None:
    """TensorRT's KL search over the ``|x|`` histogram ``h``: how many bins to keep
    (threshold ``i w``), or None when there are no more bins than levels.

    Candidate ``i`` merges ``h[:i]`` into ``levels`` groups of ``q = i // levels`` bins,
    the last group also taking the ``i - levels q`` left over (the grouping of TensorRT's
    reference search, MXNet and onnxruntime). All candidates with the same ``q`` share
    their first ``levels - 1`` groups, so the search costs one pass over the ``n // levels``
    group widths plus O(1) per candidate from prefix sums."""
    n = h.size
    if n <= levels:
        return None
    h = h.astype(np.float64)
    total = h.sum()
    hlogh = h * np.log(np.maximum(h, 1.0))
    cum = np.concatenate(([0.0], np.cumsum(h)))
    cum_nonzero = np.concatenate(([0.0], np.cumsum(h > 0)))
    cum_hlogh = np.concatenate(([0.0], np.cumsum(hlogh)))

    def merged(s: np.ndarray, nz: np.ndarray) -> np.ndarray:
        """``S log(S / n)`` of groups holding ``S`` counts in ``n`` non-empty bins (0 when empty)."""
        return s * np.log(np.maximum(s, 1.0) / np.maximum(nz, 1.0))

    # sum_g S_g log(S_g / n_g) over the first levels - 1 groups, for each width q
    edges = np.arange(1, n // levels + 1)[:, None] * np.arange(levels)[None, :]
    shared = merged(np.diff(cum[edges], axis=1), np.diff(cum_nonzero[edges], axis=1)).sum(axis=1)
    cand = np.arange(levels, n + 1)
    width = cand // levels
    first = (levels - 1) * width  # the last group: bins first .. i - 1
    s_last, nz_last = cum[cand] - cum[first], cum_nonzero[cand] - cum_nonzero[first]
    log_ratio_last = np.log(np.maximum(s_last, 1.0) / np.maximum(nz_last, 1.0))
    # sum_j p_j log(p_j / q_j) = sum_{j < i} h_j log h_j - sum_g S_g log(S_g / n_g), in counts
    terms = cum_hlogh[cand] - shared[width - 1] - s_last * log_ratio_last
    last = h[cand - 1]
    clipped = total - cum[cand]
    grown = last + clipped
    # Clipped mass moved into an empty last bin meets q = 0 there; smooth that q to
    # _EMPTY_BIN_Q (MXNet's and onnxruntime's epsilon) so sparse tails can be cut.
    log_q_last = np.where(last > 0, log_ratio_last, math.log(_EMPTY_BIN_Q))
    correction = grown * np.log(np.maximum(grown, 1.0)) - hlogh[cand - 1] - clipped * log_q_last
    kl = (terms + correction) / total + np.log(np.maximum(cum[cand], 1.0) / total)
    kl[cum[cand] == 0] = np.inf
    return int(cand[int(np.argmin(kl))])


class EntropyObserver(HistogramObserver):
    """TensorRT-style threshold minimizing KL(P || Q) over the ``|x|`` histogram."""

    def __init__(self, bits: int = 8, bins: int = DEFAULT_BINS) -> None:
        super().__init__(bins)
        self.bits = bits

    def compute_range(self) -> tuple[float, float]:
        self._require_data()
        if self.histogram.counts is None:
            return self.min, self.max
        one_sided = self.min >= 0.0
        levels = 2**self.bits if one_sided else 2 ** (self.bits - 1)
        folded, width = self._abs_histogram(ENTROPY_BINS)
        if folded.size > 1:
            # The first bin holds every exact zero (half of a ReLU output); left as is,
            # keeping that spike apart from its neighbours dominates the KL and pulls the
            # threshold far down. pytorch-quantization sets it to the second bin's count.
            folded[0] = folded[1]
        keep = _entropy_threshold_bins(folded, levels)
        if keep is None:
            logger.debug("entropy: %d bins <= %d levels, keeping the full range", folded.size, levels)
            return self.min, self.max
        t = keep * width
        return self._clamp(-t, t)


class MSEObserver(HistogramObserver):
    """The range ``[a, b]`` minimizing the expected rounding plus clipping squared error."""

    def __init__(self, bits: int = 8, bins: int = DEFAULT_BINS, max_rounds: int = 20) -> None:
        super().__init__(bins)
        self.bits = bits
        self.max_rounds = max_rounds

    def compute_range(self) -> tuple[float, float]:
        self._require_data()
        if self.histogram.counts is None:
            return self.min, self.max
        counts, width, zero = self.histogram.with_zero_edge(2 * self.histogram.bins)
        h = counts.astype(np.float64)
        n = h.size
        edges = (np.arange(n + 1) - zero) * width
        centres = edges[:-1] + width / 2
        c0, c1, c2 = (np.concatenate(([0.0], np.cumsum(h * centres**p))) for p in (0, 1, 2))
        spread = width * width / 12.0  # mean squared offset of a value from its bin centre
        # Error of clipping the bins below edge k up to edges[k], and those at or above edge m down to edges[m].
        below = np.maximum(c2 - 2.0 * edges * c1 + edges**2 * c0, 0.0) + spread * c0
        r0, r1, r2 = c0[-1] - c0, c1[-1] - c1, c2[-1] - c2
        above = np.maximum(r2 - 2.0 * edges * r1 + edges**2 * r0, 0.0) + spread * r0
        levels = float(2**self.bits - 1)

        def cost(k, m):  # expected squared error of the range [edges[k], edges[m]]
            step = (edges[m] - edges[k]) / levels
            return (c0[m] - c0[k]) * step * step / 12.0 + below[k] + above[m]

        lower, upper = np.arange(0, zero + 1), np.arange(zero, n + 1)
        k, m = 0, n
        for _ in range(self.max_rounds):
            new_m = int(upper[np.argmin(cost(k, upper))])
            new_k = int(lower[np.argmin(cost(lower, new_m))])
            if (new_k, new_m) == (k, m):
                break
            k, m = new_k, new_m
        return self._clamp(edges[k], edges[m])


def observer_for(
    method: str,
    *,
    percentile: float = 99.99,
    symmetric: bool = False,
    bits: int = 8,
    bins: int = DEFAULT_BINS,
    averaging_constant: float = 0.01,
) -> Observer:
    """A fresh observer for a calibration ``method`` (see `qconfig.CALIBRATION_METHODS`)."""
    if method == "minmax":
        return MinMaxObserver()
    if method == "moving_average":
        return MovingAverageMinMaxObserver(averaging_constant)
    if method == "percentile":
        return PercentileObserver(percentile, symmetric=symmetric, bins=bins)
    if method == "entropy":
        return EntropyObserver(bits, bins=bins)
    if method == "mse":
        return MSEObserver(bits, bins=bins)
    raise ValueError(f"unknown calibration method '{method}'")
