"""HQQ (Badri & Shaji 2023): data-free optimization of each group's zero point.

Minimizes ``||W - (Q - z) s||_p^p`` with ``p < 1`` (heavy-tailed weight errors: a few large errors
are cheaper than many medium ones) over the float zero point ``z``, by half-quadratic splitting: an
auxiliary error ``E`` is updated by the generalized soft-threshold
``shrink(x) = sign(x) * relu(|x| - |x|^(p-1) / beta)``, then ``z`` in closed form as the group mean of
``Q - (W - E) / s``, with ``Q = round(W / s + z)``; ``beta`` grows by ``kappa`` per step. The scale
stays the min-max one. The best ``z`` seen (the min-max start included) is kept, so HQQ never does
worse than round-to-nearest on its objective. Zero points stay float (the int4 kernels take float
zeros).
"""

from __future__ import annotations

import torch

from qcompiler.config import HQQ, WeightScheme
from qcompiler.core import primitives
from qcompiler.core.ir import QuantizedWeight
from qcompiler.passes.weight_rounding.common import fp16_qparams, group_size_of, grouped, minmax_qparams


def lp_error(w: torch.Tensor, w_hat: torch.Tensor, p: float) -> torch.Tensor:
    """``sum |w - w_hat|^p`` per group (last dim)."""
    return (w - w_hat).abs().pow(p).sum(-1)


def _shrink(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    return torch.sign(x) * torch.relu(x.abs() - x.abs().clamp_min(1e-12).pow(p - 1) / beta)


def hqq_quantize(weight: torch.Tensor, scheme: WeightScheme, config: HQQ | None = None) -> QuantizedWeight:
    config = config or HQQ()
    if scheme.symmetric:
        raise ValueError("HQQ optimizes the zero point: give an asymmetric WeightScheme (symmetric=False)")
    n, k = weight.shape
    group = group_size_of(scheme, k)
    qmin, qmax = scheme.qrange
    w = grouped(weight.detach().to(torch.float32), group)  # [N, G, g]
    primitives.check_finite(w, "weight")
    scale, zp = minmax_qparams(w, scheme)
    s = scale[..., None]
    z = zp.to(torch.float32)[..., None]

    block = primitives.per_token(3)

    def reconstruct(zero):
        q = primitives.quantize_math(w, s, zero, block, qmin, qmax, torch.float32)
        return q, primitives.dequantize_math(q, s, zero, block, torch.float32)

    q, w_hat = reconstruct(z)
    best_err, best_z = lp_error(w, w_hat, config.lp_norm), z.clone()
    beta = config.beta
    for _ in range(config.iters):
        e = _shrink(w - w_hat, beta, config.lp_norm)
        z = (q - (w - e) / s).mean(-1, keepdim=True)
        beta *= config.kappa
        q, w_hat = reconstruct(z)
        err = lp_error(w, w_hat, config.lp_norm)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_z = torch.where(better[..., None], z, best_z)
    if scheme.fp16_scales:  # the optimized zero points on the grid that makes -zero * scale an fp16 number
        best_z = fp16_qparams(scale, best_z[..., 0], False)[1][..., None]
    q, _ = reconstruct(best_z)
    return QuantizedWeight(
        q=q.reshape(n, k).to(primitives.storage_dtype(qmin, qmax)),
        scale=scale.to(torch.float32),
        zero_point=best_z[..., 0].to(torch.float32),
        block_size=scheme.block_size(),
        bits=scheme.bits,
        symmetric=False,
    )
