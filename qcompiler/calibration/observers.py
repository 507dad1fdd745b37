"""Calibration observers: bounded-size statistics of each linear layer's input, gathered batch by batch.

:class:`ActivationObserver` keeps, per layer input, what every range method can use: exact min/max (per
tensor and per channel) and their moving averages over batches, and a :class:`~qcompiler.core.histogram.Histogram`
per tensor (and per channel when asked: ``channel_bins``). Frozen, they are :class:`ActivationRanges`,
which turn into a range per tensor (:meth:`ActivationRanges.range`, what static activations use) or per
input channel (:meth:`ActivationRanges.channel_range`) by the methods of :mod:`qcompiler.core.ranges`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qcompiler.core.errors import CalibrationError
from qcompiler.core.histogram import DEFAULT_BINS, Histogram
from qcompiler.core.ranges import OBSERVERS, clip_range
from qcompiler.lowering.kernels import native

DEFAULT_EMA_MOMENTUM = 0.1


MAX_NATIVE_BINS = 1 << 16  # qcompiler::histogram_bins keeps per-thread partial counts of every bin


def _native_count_bins(bins: int):
    """The C++ bin counter (``qcompiler::histogram_bins``: one pass over the values instead of the torch ops'
    seven, the same counts) for histograms of ``bins`` bins, None where the native kernels cannot be built."""
    usable = bins <= MAX_NATIVE_BINS and native.unavailable_reason() is None
    return torch.ops.qcompiler.histogram_bins if usable else None


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
        """Per-tensor ``(lo, hi)`` by ``method`` (one of :data:`~qcompiler.core.ranges.OBSERVERS`)."""
        if method == "ema":
            return float(self.ema_min), float(self.ema_max)
        if method not in OBSERVERS:
            raise ValueError(f"unknown observer {method!r}; choose one of {', '.join(OBSERVERS)}")
        lo, hi = clip_range(method, self.min.reshape(1).double(), self.max.reshape(1).double(), bits, symmetric,
                            percentile, hist=self.histogram())
        lo, hi = float(lo[0]), float(hi[0])
        if method == "percentile":  # the histogram places values within a bin: never past the exact extremes
            return min(lo, 0.0), max(hi, 0.0)
        return lo, hi

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
        if method not in OBSERVERS:
            raise ValueError(f"unknown observer {method!r}; choose one of {', '.join(OBSERVERS)}")
        if method == "ema":
            if self.channel_ema_min is None:
                raise ValueError("these statistics hold no per-channel moving averages (saved by an older "
                                 "qcompiler): calibrate again")
            lo, hi = self.channel_ema_min.double(), self.channel_ema_max.double()
        else:
            hist = self.channel_histogram()
            if hist is None and method != "minmax":
                raise ValueError(f"per-channel {method!r} ranges need per-channel histograms: calibrate with "
                                 "qcompiler.calibrate(model, batches, recipe, channel_bins=1024)")
            if hist is None:
                lo, hi = lo_exact, hi_exact
            else:
                lo, hi = clip_range(method, lo_exact, hi_exact, bits, symmetric, percentile, hist=hist)
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
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        if flat.numel() == 0:
            return
        cmin, cmax = flat.amin(0), flat.amax(0)  # NaN where a channel holds one, +-inf where it holds one
        bmin, bmax = cmin.min(), cmax.max()
        if not (torch.isfinite(bmin) and torch.isfinite(bmax)):
            raise CalibrationError(
                f"calibration: the input of layer {self.name!r} holds inf/NaN on batch {self.batches}; "
                "check the calibration data and the model in float, or skip this layer in the recipe"
            )
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
        self.hist.update(flat, torch.maximum(-bmin, bmax).reshape(1), count_bins=_native_count_bins(self.hist.bins))
        if self.channel_hist is not None:
            self.channel_hist.update(flat, torch.maximum(-cmin, cmax))
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
