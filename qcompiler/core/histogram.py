"""A fixed-memory histogram whose bins merge exactly: the summary static activation ranges are chosen from.

Values are counted on a power-of-two grid, so that two histograms of the same data merge exactly and
memory stays fixed however long calibration runs; ``channels`` rows are kept independently (per tensor:
one row; per input channel: one row per channel).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

DEFAULT_BINS = 2048


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

    def update(self, x: torch.Tensor, absmax: torch.Tensor | None = None,
               count_bins: Callable[[torch.Tensor, int, int], torch.Tensor] | None = None) -> None:
        """Add the values of ``x`` (``[..., channels]``, or any shape for one channel); ``absmax``, the largest
        ``|x|`` per channel, when the caller has it (else it is computed). ``count_bins(values, shift, bins)``,
        where given, counts one channel's float32 values into its bins (the calibration observers pass the C++
        ``qcompiler::histogram_bins``) and must count as the torch ops below do.

        A value's bin is ``floor(x * 2**shift) + bins/2`` with ``2**shift = bins / (2R)``. For float32 (and
        half) inputs with ``-100 <= shift <= 126`` that product is taken in float32: a power-of-two scaling is
        exact there unless the result is subnormal, and the only such result whose floor could change is a
        negative value flushed to -0.0 (its floor is -1), which is put right; otherwise in float64. Either
        way the counts are those of the exact product."""
        x = x.detach()
        x = x.reshape(-1, self.channels) if self.channels > 1 else x.reshape(-1, 1)
        if absmax is None:
            absmax = x.abs().amax(0) if x.numel() else torch.zeros(self.channels)
        self._coarsen(torch.maximum(self.exponent, self.exponent_for(absmax)))
        shift = int(math.log2(self.bins)) - 1 - self.exponent  # x * 2**shift lies in [-bins/2, bins/2)
        if count_bins is not None and self.channels == 1 and x.dtype == torch.float32:
            self.counts[0] += count_bins(x, int(shift[0]), self.bins).to(torch.float64)
            return
        lowest, highest = int(shift.min()), int(shift.max())
        if x.dtype in (torch.float32, torch.float16, torch.bfloat16) and -100 <= lowest <= highest <= 126:
            y = x.float() * torch.pow(2.0, shift.float())
            if lowest < 0:
                y = torch.where((y == 0) & (x < 0), -1.0, y)
            y = y.floor_()
        else:
            y = torch.floor(x.double() * torch.pow(2.0, shift.double()))
        index = y.add_(self.bins // 2).clamp_(0, self.bins - 1).to(torch.int64)
        if self.channels > 1:
            index = index + torch.arange(self.channels) * self.bins
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
