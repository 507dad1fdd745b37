"""Range selection: which ``[lo, hi]`` a tensor is quantized over.

Activations are seen batch by batch during calibration. :class:`ActivationObserver` keeps, per
layer input, bounded-size statistics that every range method can use:

- exact min/max (per tensor and per channel) and their moving averages over batches;
- a :class:`Histogram` of values on a power-of-two grid, so that two histograms of the same data
  merge exactly and memory stays fixed however long calibration runs; per tensor always, per
  channel when asked (``channel_bins``: ``C x channel_bins`` counts per layer input).

The methods (``minmax``, ``ema``, ``percentile``, ``mse``, ``kl``) turn those statistics into a range:
per tensor with :meth:`ActivationRanges.range` (what static activations use), per input channel
with :meth:`ActivationRanges.channel_range`. Weights are static and small, so their ranges are
computed on the tensor itself (:func:`weight_range`), per tensor, per output channel or per group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qcompiler import primitives
from qcompiler.errors import CalibrationError

OBSERVERS = ("minmax", "ema", "percentile", "mse", "kl")
WEIGHT_OBSERVERS = ("minmax", "percentile", "mse", "kl")
DEFAULT_BINS = 2048
DEFAULT_EMA_MOMENTUM = 0.1
MSE_GRID = 100  # clipping ratios 0.01..1.00 of the full range
KL_MIN_BINS = 128  # smallest |x| range considered by the KL search, in bins of the half-histogram


# --- quantization error of a clipping range --------------------------------------------------------


def _fake_quant(values: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, qmin: int, qmax: int, symmetric: bool):
    """Quantize-dequantize ``values [G, V]`` with range ``[lo, hi]`` (each ``[G, 1]``), as the kernels would."""
    scale, zero_point = primitives.qparams_from_range(lo, hi, qmin, qmax, symmetric)
    scale, zero_point = scale.double(), zero_point.double()
    return (torch.round(values / scale) + zero_point).clamp(qmin, qmax).sub(zero_point) * scale


def mse_clip(values: torch.Tensor, weights: torch.Tensor | None, lo: torch.Tensor, hi: torch.Tensor,
             bits: int, symmetric: bool, grid: int = MSE_GRID) -> tuple[torch.Tensor, torch.Tensor]:
    """The range ``ratio * [lo, hi]`` (ratio in ``1/grid .. 1``) that minimizes the squared error.

    ``values [G, V]`` with optional ``weights [G, V]`` (histogram counts); ``lo``/``hi`` ``[G]``.
    Returns the chosen ``(lo, hi)`` per group. Ties go to the widest range.
    """
    qmin, qmax = primitives.quant_range(bits, symmetric)
    values = values.double()
    lo, hi = lo.double()[:, None], hi.double()[:, None]
    best_err = torch.full((values.shape[0],), math.inf, dtype=torch.float64)
    best_ratio = torch.ones(values.shape[0], dtype=torch.float64)
    for step in range(grid, 0, -1):
        ratio = step / grid
        err = (_fake_quant(values, lo * ratio, hi * ratio, qmin, qmax, symmetric) - values).pow(2)
        if weights is not None:
            err = err * weights
        err = err.sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
    return lo[:, 0] * best_ratio, hi[:, 0] * best_ratio


# --- histogram --------------------------------------------------------------------------------------


class Histogram:
    """Counts of values on the grid ``[-R, R)`` in ``bins`` equal bins, ``R`` a power of two per channel.

    A value ``x`` falls in bin ``floor(x * bins / (2R)) + bins/2``: multiplying by a power of two is
    exact in floating point, so coarsening the grid (doubling ``R``) sums adjacent bins exactly and
    ``merge(hist(a), hist(b)) == hist(a ++ b)``. ``channels`` rows are kept independently.
    """

    def __init__(self, channels: int = 1, bins: int = DEFAULT_BINS) -> None:
        if bins < 2 or bins & (bins - 1):
            raise ValueError(f"bins must be a power of two >= 2, got {bins}")
        self.bins = bins
        self.counts = torch.zeros(channels, bins, dtype=torch.float64)
        self.exponent = torch.full((channels,), -126, dtype=torch.int64)  # R = 2**exponent

    @property
    def channels(self) -> int:
        return self.counts.shape[0]

    @property
    def edges_scale(self) -> torch.Tensor:
        """Bin width per channel."""
        return torch.pow(2.0, self.exponent.double()) * 2 / self.bins

    def _coarsen(self, new_exponent: torch.Tensor) -> None:
        shift = (new_exponent - self.exponent).clamp_min(0)
        for d in shift.unique().tolist():
            if d == 0:
                continue
            rows = (shift == d).nonzero().flatten()
            if d >= int(math.log2(self.bins)):
                total = self.counts[rows].sum(-1)
                # the whole old grid falls in the two centre bins of the new one: split by sign
                merged = torch.zeros(len(rows), self.bins, dtype=torch.float64)
                half = self.bins // 2
                merged[:, half - 1] = self.counts[rows, :half].sum(-1)
                merged[:, half] = total - merged[:, half - 1]
                self.counts[rows] = merged
                continue
            factor = 2**d
            # fine bins [0, bins) map to coarse bins offset + i // factor, offset = bins/2 - bins/(2 factor)
            grouped = self.counts[rows].reshape(len(rows), self.bins // factor, factor).sum(-1)
            offset = self.bins // 2 - self.bins // (2 * factor)
            merged = torch.zeros(len(rows), self.bins, dtype=torch.float64)
            merged[:, offset : offset + self.bins // factor] = grouped
            self.counts[rows] = merged
        self.exponent = torch.maximum(self.exponent, new_exponent)

    @staticmethod
    def exponent_for(absmax: torch.Tensor) -> torch.Tensor:
        """Smallest e with ``absmax < 2**e`` (so every value lies strictly inside the grid)."""
        safe = absmax.double().clamp_min(2.0**-126)
        e = torch.floor(torch.log2(safe)).to(torch.int64) + 1
        return e.clamp_min(-126)

    def update(self, x: torch.Tensor) -> None:
        """Add the values of ``x`` (``[..., channels]``, or any shape for one channel)."""
        x = x.detach().double()
        x = x.reshape(-1, self.channels) if self.channels > 1 else x.reshape(1, -1).t()
        absmax = x.abs().amax(0) if x.numel() else torch.zeros(self.channels, dtype=torch.float64)
        self._coarsen(torch.maximum(self.exponent, self.exponent_for(absmax)))
        inv_width = self.bins / 2 / torch.pow(2.0, self.exponent.double())  # a power of two
        index = torch.floor(x * inv_width).to(torch.int64) + self.bins // 2
        index = index.clamp(0, self.bins - 1) + torch.arange(self.channels) * self.bins
        self.counts += torch.bincount(index.flatten(), minlength=self.channels * self.bins).reshape(
            self.channels, self.bins).to(torch.float64)

    def merge(self, other: Histogram) -> Histogram:
        """A new histogram of both inputs' values."""
        if other.bins != self.bins or other.channels != self.channels:
            raise ValueError("histograms with different bins or channels cannot be merged")
        exponent = torch.maximum(self.exponent, other.exponent)
        out = self.copy()
        out._coarsen(exponent)
        theirs = other.copy()
        theirs._coarsen(exponent)
        out.counts += theirs.counts
        return out

    def copy(self) -> Histogram:
        h = Histogram(self.channels, self.bins)
        h.counts = self.counts.clone()
        h.exponent = self.exponent.clone()
        return h

    def centers(self) -> torch.Tensor:
        """Bin centres ``[channels, bins]``."""
        width = self.edges_scale[:, None]
        return (torch.arange(self.bins, dtype=torch.float64) - self.bins // 2 + 0.5) * width

    def lower_edges(self) -> torch.Tensor:
        width = self.edges_scale[:, None]
        return (torch.arange(self.bins, dtype=torch.float64) - self.bins // 2) * width

    @property
    def total(self) -> torch.Tensor:
        return self.counts.sum(-1)

    # --- range methods on the histogram ---------------------------------------------------------

    def _order_statistic(self, k: torch.Tensor) -> torch.Tensor:
        """Approximate value of the k-th smallest value (0-based) per channel, within one bin."""
        cdf = self.counts.cumsum(-1)
        idx = torch.searchsorted(cdf, k[:, None] + 1).clamp(max=self.bins - 1)
        prev = torch.where(idx > 0, cdf.gather(-1, (idx - 1).clamp_min(0)), torch.zeros_like(idx, dtype=cdf.dtype))
        in_bin = self.counts.gather(-1, idx).clamp_min(1)
        # the bin's values are taken as spread evenly over it
        frac = ((k[:, None] - prev + 0.5) / in_bin).clamp(0, 1)
        return (self.lower_edges().gather(-1, idx) + frac * self.edges_scale[:, None])[:, 0]

    def percentile(self, q: float) -> torch.Tensor:
        """The q-th percentile (0..100) per channel, interpolating between order statistics as numpy does."""
        rank = (self.total - 1).clamp_min(0) * (q / 100.0)
        below = torch.floor(rank)
        above = torch.minimum(below + 1, (self.total - 1).clamp_min(0))
        v_below, v_above = self._order_statistic(below), self._order_statistic(above)
        return v_below + (rank - below) * (v_above - v_below)


def _smooth(d: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Give the empty bins of a normalized distribution a little mass so that KL stays finite."""
    d = torch.where(d == 0, torch.full_like(d, eps), d)
    return d / d.sum()


def _kl_for_threshold(p_full: torch.Tensor, i: int, levels: int) -> float:
    p = p_full[:i].clone()
    p[i - 1] += p_full[i:].sum()  # P: clipped values pile up in the last kept bin
    # Q: the kept bins (before folding) quantized into `levels` near-equal chunks, each chunk's mass
    # spread evenly over its non-empty bins; the folded mass it cannot represent is what KL charges
    kept = p_full[:i]
    chunk = torch.div(torch.arange(i) * levels, i, rounding_mode="floor")
    mass = torch.zeros(levels, dtype=torch.float64).index_add_(0, chunk, kept)
    used = torch.zeros(levels, dtype=torch.float64).index_add_(0, chunk, (kept > 0).double())
    q = torch.where(kept > 0, (mass / used.clamp_min(1))[chunk], torch.zeros_like(kept))
    if p.sum() == 0 or q.sum() == 0:
        return math.inf
    p_n, q_n = p / p.sum(), _smooth(q / q.sum())
    mask = p_n > 0
    return float((p_n[mask] * (p_n[mask] / q_n[mask]).log()).sum())


def kl_clip(hist: Histogram, bits: int, max_candidates: int = 256) -> torch.Tensor:
    """Symmetric clipping threshold per channel minimizing KL(P || Q) (TensorRT-style entropy calibration).

    P is the distribution of |x| over the histogram's bins, with the mass beyond the threshold folded
    into the last kept bin; Q is the kept bins quantized to the ``2^(bits-1)`` levels the threshold
    allows (each level's mass spread evenly over its non-empty bins, empty bins smoothed). Candidate
    thresholds are bin edges stepping down from the largest value by an even stride, not below
    ``max(KL_MIN_BINS, levels)`` bins, at most ``max_candidates`` (>= 2) of them.
    """
    if max_candidates < 2:
        raise ValueError(f"max_candidates must be at least 2 (the largest value and the smallest threshold), "
                         f"got {max_candidates}")
    half = hist.bins // 2
    mags = hist.counts[:, half:] + hist.counts[:, :half].flip(-1)  # |x| histogram, [C, half]
    levels = 2 ** (bits - 1)
    thresholds = []
    for c in range(hist.channels):
        p_full = mags[c]
        if not p_full.any():
            thresholds.append(0.0)
            continue
        nonzero = int(p_full.nonzero().max()) + 1
        start = min(max(KL_MIN_BINS, levels), nonzero)
        # ceil(span / (max_candidates - 1)) keeps the count of candidates (both ends included) <= max_candidates
        stride = max(1, -(-(nonzero - start) // max(1, max_candidates - 1)))
        candidates = list(range(nonzero, start - 1, -stride))
        kls = [_kl_for_threshold(p_full, i, levels) for i in candidates]
        best = candidates[min(range(len(kls)), key=kls.__getitem__)]
        thresholds.append(best * float(hist.edges_scale[c]))
    return torch.tensor(thresholds, dtype=torch.float64)


# --- activation statistics -------------------------------------------------------------------------


@dataclass(frozen=True)
class ActivationRanges:
    """The statistics of one layer input, frozen at the end of calibration."""

    min: torch.Tensor  # [] exact over all batches
    max: torch.Tensor
    ema_min: torch.Tensor  # [] moving average of per-batch min/max
    ema_max: torch.Tensor
    channel_min: torch.Tensor  # [C]
    channel_max: torch.Tensor  # [C]
    hist_counts: torch.Tensor  # [1, bins] per-tensor histogram
    hist_exponent: torch.Tensor  # [1]
    batches: int
    samples: torch.Tensor | None = None  # [n, C] rows kept by reservoir sampling (for searches)
    channel_ema_min: torch.Tensor | None = None  # [C] moving average of per-batch channel min/max
    channel_ema_max: torch.Tensor | None = None
    channel_hist_counts: torch.Tensor | None = None  # [C, channel_bins], when calibrated with channel_bins
    channel_hist_exponent: torch.Tensor | None = None  # [C]

    def histogram(self) -> Histogram:
        h = Histogram(1, self.hist_counts.shape[-1])
        h.counts = self.hist_counts.clone().double()
        h.exponent = self.hist_exponent.clone().long()
        return h

    def range(self, method: str, bits: int, symmetric: bool, percentile: float = 99.99) -> tuple[float, float]:
        """Per-tensor ``(lo, hi)`` by ``method`` (one of :data:`OBSERVERS`)."""
        if method == "minmax":
            return float(self.min), float(self.max)
        if method == "ema":
            return float(self.ema_min), float(self.ema_max)
        hist = self.histogram()
        if method == "percentile":
            # the histogram places values within a bin: never past the exact extremes
            lo = max(float(hist.percentile(100.0 - percentile)[0]), float(self.min))
            hi = min(float(hist.percentile(percentile)[0]), float(self.max))
            return min(lo, 0.0), max(hi, 0.0)
        if method == "mse":
            values, weights = hist.centers(), hist.counts
            lo, hi = mse_clip(values, weights, self.min.reshape(1).double(), self.max.reshape(1).double(),
                              bits, symmetric)
            return float(lo[0]), float(hi[0])
        if method == "kl":
            t = float(kl_clip(hist, bits)[0])
            return max(float(self.min), -t), min(float(self.max), t)
        raise ValueError(f"unknown observer {method!r}; choose one of {', '.join(OBSERVERS)}")

    def channel_histogram(self) -> Histogram | None:
        if self.channel_hist_counts is None:
            return None
        h = Histogram(self.channel_hist_counts.shape[0], self.channel_hist_counts.shape[-1])
        h.counts = self.channel_hist_counts.clone().double()
        h.exponent = self.channel_hist_exponent.clone().long()
        return h

    def channel_range(self, method: str, bits: int, symmetric: bool,
                      percentile: float = 99.99) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-input-channel ``(lo [C], hi [C])`` by ``method``; each range contains 0.

        ``minmax`` and ``ema`` are always available; ``percentile``, ``mse`` and ``kl`` need the
        per-channel histograms (``qcompiler.calibrate(..., channel_bins=1024)``).
        """
        lo_exact, hi_exact = self.channel_min.double(), self.channel_max.double()
        if method == "minmax":
            lo, hi = lo_exact, hi_exact
        elif method == "ema":
            if self.channel_ema_min is None:
                raise ValueError("these statistics hold no per-channel moving averages (saved by an older "
                                 "qcompiler): calibrate again")
            lo, hi = self.channel_ema_min.double(), self.channel_ema_max.double()
        elif method in ("percentile", "mse", "kl"):
            hist = self.channel_histogram()
            if hist is None:
                raise ValueError(f"per-channel {method!r} ranges need per-channel histograms: calibrate with "
                                 "qcompiler.calibrate(model, batches, recipe, channel_bins=1024)")
            if method == "percentile":
                lo = torch.maximum(hist.percentile(100.0 - percentile), lo_exact)
                hi = torch.minimum(hist.percentile(percentile), hi_exact)
            elif method == "mse":
                lo, hi = mse_clip(hist.centers(), hist.counts, lo_exact, hi_exact, bits, symmetric)
            else:
                t = kl_clip(hist, bits)
                lo, hi = torch.maximum(lo_exact, -t), torch.minimum(hi_exact, t)
        else:
            raise ValueError(f"unknown observer {method!r}; choose one of {', '.join(OBSERVERS)}")
        return lo.clamp_max(0).float(), hi.clamp_min(0).float()


class ActivationObserver:
    """Accumulates :class:`ActivationRanges` for one layer input across calibration batches."""

    def __init__(self, name: str, bins: int = DEFAULT_BINS, momentum: float = DEFAULT_EMA_MOMENTUM,
                 sample_rows: int = 0, channel_bins: int = 0) -> None:
        if channel_bins and (channel_bins < 2 or channel_bins & (channel_bins - 1)):
            raise ValueError(f"channel_bins must be 0 (no per-channel histograms) or a power of two >= 2, "
                             f"got {channel_bins}")
        self.name = name
        self.channel_bins = channel_bins
        self.channel_hist: Histogram | None = None
        self.momentum = momentum
        self.sample_rows = sample_rows
        self.samples: torch.Tensor | None = None
        self._rows_seen = 0
        self._stride = 1
        self.hist = Histogram(1, bins)
        self.min = self.max = self.ema_min = self.ema_max = None
        self.channel_min = self.channel_max = None
        self.channel_ema_min = self.channel_ema_max = None
        self.batches = 0

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach()
        if not torch.isfinite(x).all():
            raise CalibrationError(
                f"calibration: the input of layer {self.name!r} holds inf/NaN on batch {self.batches}; "
                "check the calibration data and the model in float, or skip this layer in the recipe"
            )
        flat = x.reshape(-1, x.shape[-1]).float()
        if flat.numel() == 0:
            return
        cmin, cmax = flat.amin(0), flat.amax(0)
        bmin, bmax = cmin.min(), cmax.max()
        if self.batches == 0:
            self.min, self.max, self.ema_min, self.ema_max = bmin, bmax, bmin, bmax
            self.channel_min, self.channel_max = cmin, cmax
            self.channel_ema_min, self.channel_ema_max = cmin, cmax
            if self.channel_bins:
                self.channel_hist = Histogram(flat.shape[-1], self.channel_bins)
        else:
            if cmin.shape != self.channel_min.shape:
                raise CalibrationError(
                    f"calibration: the input of layer {self.name!r} has {cmin.numel()} channels on batch "
                    f"{self.batches}, {self.channel_min.numel()} before"
                )
            self.min, self.max = torch.minimum(self.min, bmin), torch.maximum(self.max, bmax)
            m = self.momentum
            self.ema_min = (1 - m) * self.ema_min + m * bmin
            self.ema_max = (1 - m) * self.ema_max + m * bmax
            self.channel_min = torch.minimum(self.channel_min, cmin)
            self.channel_max = torch.maximum(self.channel_max, cmax)
            self.channel_ema_min = (1 - m) * self.channel_ema_min + m * cmin
            self.channel_ema_max = (1 - m) * self.channel_ema_max + m * cmax
        self.hist.update(flat)
        if self.channel_hist is not None:
            self.channel_hist.update(flat)
        if self.sample_rows:
            self._keep_samples(flat)
        self.batches += 1

    def _keep_samples(self, rows: torch.Tensor) -> None:
        """Systematic sampling: keep every ``stride``-th row of the whole stream, doubling the stride
        whenever more than twice the wanted rows are held (bounded memory, deterministic)."""
        index = torch.arange(rows.shape[0]) + self._rows_seen
        kept = rows[index % self._stride == 0]
        self._rows_seen += rows.shape[0]
        self.samples = kept.clone() if self.samples is None else torch.cat([self.samples, kept])
        while self.samples.shape[0] > 2 * self.sample_rows:
            self.samples = self.samples[::2]
            self._stride *= 2

    def _final_samples(self) -> torch.Tensor | None:
        if self.samples is None:
            return None
        if self.samples.shape[0] <= self.sample_rows:
            return self.samples.clone()
        pick = torch.linspace(0, self.samples.shape[0] - 1, self.sample_rows).round().long()
        return self.samples[pick].clone()

    def freeze(self) -> ActivationRanges:
        if self.batches == 0:
            raise CalibrationError(f"calibration: layer {self.name!r} was never run")
        return ActivationRanges(
            min=self.min.clone(), max=self.max.clone(), ema_min=self.ema_min.clone(), ema_max=self.ema_max.clone(),
            channel_min=self.channel_min.clone(), channel_max=self.channel_max.clone(),
            hist_counts=self.hist.counts.clone(), hist_exponent=self.hist.exponent.clone(), batches=self.batches,
            samples=self._final_samples(),
            channel_ema_min=self.channel_ema_min.clone(), channel_ema_max=self.channel_ema_max.clone(),
            channel_hist_counts=None if self.channel_hist is None else self.channel_hist.counts.float(),
            channel_hist_exponent=None if self.channel_hist is None else self.channel_hist.exponent.clone(),
        )


# --- weights ------------------------------------------------------------------------------------------


def weight_range(w: torch.Tensor, block_size, method: str, bits: int, symmetric: bool,
                 percentile: float = 99.99) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block ``(lo, hi)`` of a weight by ``method`` (:data:`WEIGHT_OBSERVERS`).

    minmax, percentile and mse are computed on the values themselves; kl on a histogram of each block
    (``DEFAULT_BINS`` bins, at most 64 candidate thresholds per block, one Python loop per block: about
    a second per 100 output channels, so it is offered per channel and per tensor, not per group).
    """
    blocked, _, out_shape = primitives._blocked_shapes(w.shape, block_size)
    # [blocks, values]: move the block-interior dims last
    nd = len(block_size)
    perm = list(range(0, 2 * nd, 2)) + list(range(1, 2 * nd, 2))
    groups = w.detach().double().reshape(blocked).permute(perm).reshape(math.prod(out_shape), -1)
    lo, hi = groups.amin(-1), groups.amax(-1)
    if method == "minmax":
        pass
    elif method == "percentile":
        q = torch.tensor([1 - percentile / 100.0, percentile / 100.0], dtype=torch.float64)
        qs = torch.quantile(groups, q, dim=-1)
        lo, hi = qs[0], qs[1]
    elif method == "mse":
        lo, hi = mse_clip(groups, None, lo, hi, bits, symmetric)
    elif method == "kl":
        hist = Histogram(groups.shape[0], DEFAULT_BINS)
        hist.update(groups.t())
        t = kl_clip(hist, bits, max_candidates=64)
        lo, hi = torch.maximum(lo, -t), torch.minimum(hi, t)
    else:
        raise ValueError(f"unknown weight observer {method!r}; choose one of {', '.join(WEIGHT_OBSERVERS)}")
    return lo.clamp_max(0).reshape(out_shape).float(), hi.clamp_min(0).reshape(out_shape).float()
