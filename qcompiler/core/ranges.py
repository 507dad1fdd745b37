"""Range selection: which ``[lo, hi]`` a tensor is quantized over, by min-max, percentile, MSE or KL.

Activations are summarized during calibration by histograms (:mod:`qcompiler.core.histogram`);
weights are static and small, so their ranges are computed on the values themselves. Both go through
:func:`clip_range`, the one dispatch over the methods, per block or channel (``[C]`` tensors).
"""

from __future__ import annotations

import math

import torch

from qcompiler.core import primitives
from qcompiler.core.histogram import DEFAULT_BINS, Histogram

OBSERVERS = ("minmax", "ema", "percentile", "mse", "kl")
WEIGHT_OBSERVERS = ("minmax", "percentile", "mse", "kl")
MSE_GRID = 100  # clipping ratios 0.01..1.00 of the full range
KL_MIN_BINS = 128  # smallest |x| range considered by the KL search, in bins of the half-histogram


def _fake_quant(values: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, qmin: int, qmax: int, symmetric: bool):
    """Quantize-dequantize ``values [G, V]`` with range ``[lo, hi]`` (each ``[G, 1]``), as the kernels would."""
    scale, zero_point = primitives.qparams_from_range(lo, hi, qmin, qmax, symmetric)
    return primitives.fake_quantize_math(values, primitives.per_token(2), qmin, qmax, symmetric,
                                         scale=scale.double(), zero_point=zero_point)


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


def clip_range(method: str, lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool,
               percentile: float = 99.99, *, hist: Histogram | None = None, values: torch.Tensor | None = None,
               kl_candidates: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(lo, hi)`` (float64 ``[C]``) by ``method``, from the exact extremes ``lo``/``hi`` ``[C]``
    and either a histogram with one row per ``C`` (``hist``: activations) or the values themselves
    (``values [C, V]``: weights). ``minmax`` keeps the extremes; ``percentile`` takes the two
    percentiles (interpolated as numpy does); ``mse`` the clipping ratio with the smallest squared
    quantization error; ``kl`` the symmetric threshold with the smallest KL divergence (at most
    ``kl_candidates`` thresholds per row). ``ema`` lives with the moving averages (the observers)."""
    if (hist is None) == (values is None):
        raise ValueError("clip_range takes either a histogram or the values")
    if method == "minmax":
        return lo, hi
    if method == "percentile":
        if values is not None:
            q = torch.tensor([1 - percentile / 100.0, percentile / 100.0], dtype=torch.float64)
            qs = torch.quantile(values, q, dim=-1)
            return qs[0], qs[1]
        return torch.maximum(hist.percentile(100.0 - percentile), lo), torch.minimum(hist.percentile(percentile), hi)
    if method == "mse":
        if values is not None:
            return mse_clip(values, None, lo, hi, bits, symmetric)
        return mse_clip(hist.centers(), hist.counts, lo, hi, bits, symmetric)
    if method == "kl":
        if hist is None:
            hist = Histogram(values.shape[0], DEFAULT_BINS)
            hist.update(values.t())
        t = kl_clip(hist, bits, max_candidates=kl_candidates)
        return torch.maximum(lo, -t), torch.minimum(hi, t)
    raise ValueError(f"unknown observer {method!r}; choose one of {', '.join(OBSERVERS)}")


def weight_range(w: torch.Tensor, block_size, method: str, bits: int, symmetric: bool,
                 percentile: float = 99.99) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block ``(lo, hi)`` of a weight by ``method`` (:data:`WEIGHT_OBSERVERS`), each containing 0.

    minmax, percentile and mse are computed on the values themselves; kl on a histogram of each block
    (``DEFAULT_BINS`` bins, at most 64 candidate thresholds per block, one Python loop per block: about
    a second per 100 output channels, so it is offered per channel and per tensor, not per group).
    """
    if method not in WEIGHT_OBSERVERS:
        raise ValueError(f"unknown weight observer {method!r}; choose one of {', '.join(WEIGHT_OBSERVERS)}")
    blocked, _, out_shape = primitives.blocked_shapes(w.shape, block_size)
    # [blocks, values]: move the block-interior dims last
    nd = len(block_size)
    perm = list(range(0, 2 * nd, 2)) + list(range(1, 2 * nd, 2))
    groups = w.detach().double().reshape(blocked).permute(perm).reshape(math.prod(out_shape), -1)
    lo, hi = clip_range(method, groups.amin(-1), groups.amax(-1), bits, symmetric, percentile, values=groups,
                        kl_candidates=64)
    return lo.clamp_max(0).reshape(out_shape).float(), hi.clamp_min(0).reshape(out_shape).float()
