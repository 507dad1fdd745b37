"""Round-to-nearest (RTN) weight quantization, the baseline every other rounding method is judged by."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qcompiler import observers, primitives
from qcompiler.config import WeightScheme
from qcompiler.passes.weight_rounding.common import weight_qparams


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """Integer weight ``[out, in]`` with one scale (and zero point) per block."""

    q: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    block_size: tuple[int, ...]
    bits: int
    symmetric: bool
    pairs_limited: int = 0  # how many (2j, 2j+1) pairs were shrunk by limit_pair_sums

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return primitives.dequantize_math(self.q, self.scale, self.zero_point, self.block_size, dtype)

    @property
    def nbytes(self) -> int:
        """Bytes as stored: integers at their storage width, scales and zero points as held."""
        total = self.q.numel() * self.q.element_size() + self.scale.numel() * self.scale.element_size()
        if self.zero_point is not None:
            total += self.zero_point.numel() * self.zero_point.element_size()
        return total

    @property
    def bits_per_weight(self) -> float:
        """Effective bits per weight at the storage widths actually used."""
        zp_bits = 0 if self.zero_point is None else 8 * self.zero_point.element_size()
        return primitives.bits_per_weight(
            tuple(self.q.shape), self.block_size, 8 * self.q.element_size(),
            scale_bits=8 * self.scale.element_size(), zero_point_bits=zp_bits,
        )


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


def _quantize_blocks(w, scale, zero, block_size, qmin: int, qmax: int) -> torch.Tensor:
    """``clamp(round(w / scale + zero))`` per block (``zero`` may be a float), in the storage dtype."""
    blocked, broadcast, _ = primitives._blocked_shapes(w.shape, block_size)
    x = w.to(torch.float32).reshape(blocked) / scale.reshape(broadcast)
    if zero is not None:
        x = x + zero.reshape(broadcast)
    return torch.round(x).clamp(qmin, qmax).reshape(w.shape).to(primitives.storage_dtype(qmin, qmax))


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
    if scheme.symmetric and scheme.observer == "minmax":
        scale, zero_point = primitives.choose_qparams(w, block_size, scheme.bits, scheme.symmetric)
        q = primitives.quantize(w, scale, zero_point, block_size, scheme.bits, scheme.symmetric)
    else:
        primitives.check_finite(w, "weight")
        lo, hi = observers.weight_range(w, block_size, scheme.observer, scheme.bits, scheme.symmetric,
                                        scheme.percentile)
        scale, zero_point = weight_qparams(lo, hi, qmin, qmax, scheme.symmetric)
        q = _quantize_blocks(w, scale, None if scheme.symmetric else zero_point, block_size, qmin, qmax)
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
