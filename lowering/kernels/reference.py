"""Pure-torch reference implementations of the ``qcompiler::`` kernels. Slow, exact, any device."""

from __future__ import annotations

import torch

# float64 holds every int32 accumulator exactly while K * 127 * 127 < 2**53.
_MAX_EXACT_K = 2**53 // (128 * 128)


def int8_gemm(x_q: torch.Tensor, x_zero_point: int, w_q: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """``((x_q - x_zero_point) @ w_q.T) * w_scale`` with exact integer accumulation, as float32 ``[..., N]``."""
    k = x_q.shape[-1]
    if k > _MAX_EXACT_K:
        raise ValueError(f"K={k} is too large for the exact float64 reference (max {_MAX_EXACT_K})")
    acc = (x_q.to(torch.float64) - x_zero_point) @ w_q.to(torch.float64).t()
    return acc.to(torch.float32) * w_scale.to(torch.float32)
