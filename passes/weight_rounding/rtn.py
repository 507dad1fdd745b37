"""Round-to-nearest (RTN) weight quantization, the baseline every other rounding method is judged by."""

from __future__ import annotations

import torch

from qcompiler.config import WeightScheme
from qcompiler.core import primitives
from qcompiler.core.ir import QuantizedWeight
from qcompiler.core.ranges import weight_range
from qcompiler.passes.weight_rounding.common import scheme_qparams


def limit_pair_sums(q: torch.Tensor, limit: int) -> tuple[torch.Tensor, int]:
    """Shrink each pair ``(q[:, 2j], q[:, 2j+1])`` whose ``|a| + |b|`` exceeds ``limit``.

    CPUs without VNNI multiply uint8 x int8 with ``vpmaddubsw``, which adds each pair of products
    into a saturating int16: with activations up to 255, ``255 * (|a| + |b|)`` must stay below 32768,
    so ``|a| + |b| <= 128``. The excess is taken off both magnitudes evenly (the larger gives the odd
    unit), which keeps the pair's direction and changes only the rare pairs of two large weights.
    Returns the new integer tensor and the number of pairs changed.
    """
    n, k = q.shape
    even = k - (k % 2)
    pairs = q[:, :even].to(torch.int32).reshape(n, even // 2, 2)
    mags = pairs.abs()
    excess = (mags.sum(-1) - limit).clamp_min(0)
    changed = int((excess > 0).sum())
    if changed == 0:
        return q, 0
    larger_first = mags[..., 0] >= mags[..., 1]
    cut_big = (excess + 1) // 2
    cut_small = excess // 2
    cut = torch.stack(
        [torch.where(larger_first, cut_big, cut_small), torch.where(larger_first, cut_small, cut_big)], -1
    )
    limited = pairs.sign() * (mags - cut)
    out = q.clone()
    out[:, :even] = limited.reshape(n, even).to(q.dtype)
    return out, changed


def round_to_nearest(
    weight: torch.Tensor, scheme: WeightScheme, pair_limit: int | None = None
) -> QuantizedWeight:
    """Range per block by ``scheme.observer`` (min-max by default), then round to nearest.

    ``weight`` is ``[out, in]``. Asymmetric weights get a float zero point (``common.weight_qparams``).
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    block_size = scheme.block_size()
    qmin, qmax = scheme.qrange
    w = weight.detach()
    if scheme.symmetric and scheme.observer == "minmax" and not (scheme.fp16_scales or scheme.full_range):
        scale, zero_point = primitives.choose_qparams(w, block_size, scheme.bits, scheme.symmetric)
        q = primitives.quantize(w, scale, zero_point, block_size, scheme.bits, scheme.symmetric)
    else:
        primitives.check_finite(w, "weight")
        lo, hi = weight_range(w, block_size, scheme.observer, scheme.bits, scheme.symmetric, scheme.percentile)
        scale, zero_point = scheme_qparams(lo, hi, scheme)
        # a float zero point (asymmetric): round(w / scale + zero), computed in float32 for every weight dtype
        q = primitives.quantize_math(w, scale, None if scheme.symmetric else zero_point, block_size, qmin, qmax,
                                     primitives.storage_dtype(qmin, qmax), compute_dtype=torch.float32)
    changed = 0
    if pair_limit is not None:
        if not scheme.symmetric:
            raise ValueError("pair-sum limiting applies to symmetric int8 weights only")
        q, changed = limit_pair_sums(q, pair_limit)
    return QuantizedWeight(
        q=q,
        scale=scale,
        zero_point=None if scheme.symmetric else zero_point,
        block_size=block_size,
        bits=scheme.bits,
        symmetric=scheme.symmetric,
        pairs_limited=changed,
    )
