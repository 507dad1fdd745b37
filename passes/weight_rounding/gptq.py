"""GPTQ (Frantar et al. 2022): round one column at a time and push its error onto the columns not yet
rounded, weighted by the inverse Hessian of the layer's inputs, so the layer's *output* error is small.

``H = X^T X`` over the calibration inputs of the layer (accumulated by
``passes/weight_rounding/sequential.py``). The implementation follows the paper's form: dampening
(``damp * mean(diag H)`` added to the diagonal), the Cholesky factor of ``H^-1``, columns processed in
blocks with the updates to later blocks applied lazily once per block, optional activation order
(columns by decreasing ``diag H``) and group-wise scales that are either computed from the weight as
updated when their group starts (``static_groups=False``) or from the original weight up front
(``static_groups=True``, required with activation order so that groups stay contiguous in the stored
layout).
"""

from __future__ import annotations

import torch

from qcompiler.config import GPTQ, WeightScheme
from qcompiler.core import primitives
from qcompiler.core.ir import QuantizedWeight
from qcompiler.passes.weight_rounding.common import (
    dequantize_groups,
    group_size_of,
    grouped,
    minmax_qparams,
    quantize_groups,
)


def _inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``, in float64."""
    h = hessian.to(torch.float64).clone()
    k = h.shape[0]
    diag = torch.arange(k)
    h[diag, diag] += damp * torch.mean(torch.diag(h))
    for attempt in range(6):
        try:
            chol = torch.linalg.cholesky(h)
            return torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)
        except torch.linalg.LinAlgError:
            # not positive definite (too few samples for K): dampen more
            h[diag, diag] += damp * (10**attempt) * torch.mean(torch.diag(h)).clamp_min(1e-8)
    raise ValueError("GPTQ: the Hessian stays singular after dampening; calibrate on more tokens")


def group_qparams(w_groups: torch.Tensor, channel_weight: torch.Tensor, scheme: WeightScheme, config: GPTQ):
    """Scale and integer zero point per group of ``w_groups [N, G, g]``: min-max, or with ``config.clip_grid``
    the range shrunk by the ratio (1.0 down to ``config.min_clip``) whose rounding error, weighted by
    ``channel_weight [G, g]`` (the Hessian's diagonal: each input channel's mean squared value), is smallest."""
    if config.clip_grid == 0:
        return minmax_qparams(w_groups, scheme, float_zero=False)
    best_scale = best_zero = best_err = None
    for i in range(config.clip_grid + 1):
        ratio = 1.0 - (1.0 - config.min_clip) * i / config.clip_grid
        scale, zero = minmax_qparams(w_groups, scheme, ratio, float_zero=False)
        delta = dequantize_groups(quantize_groups(w_groups, scale, zero, scheme), scale, zero, scheme) - w_groups
        err = (delta.square() * channel_weight).sum(-1)
        if best_err is None:  # ratio 1.0: min-max
            best_scale, best_zero, best_err = scale, zero, err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, scheme: WeightScheme,  # long: the paper's algorithm
                  config: GPTQ | None = None) -> QuantizedWeight:                    # reads best as one loop
    """Round ``weight [N, K]`` with GPTQ against ``hessian [K, K]`` (``X^T X`` of the layer's inputs)."""
    config = config or GPTQ()
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"GPTQ: weight {tuple(weight.shape)} and Hessian {tuple(hessian.shape)} do not match")
    if not torch.isfinite(hessian).all():
        raise ValueError("GPTQ: the Hessian has inf/NaN entries (inf/NaN in the layer's calibration inputs)")
    n, k = weight.shape
    group = group_size_of(scheme, k)
    w = weight.detach().to(torch.float32).clone()
    h = hessian.to(torch.float64).clone()
    dead = torch.diag(h) == 0  # inputs that were always zero: their weights do not matter
    h[dead, dead] = 1
    w[:, dead] = 0

    diag = torch.diag(h).to(torch.float32)
    if config.static_groups or config.act_order:  # [N, G], from the original W
        scale_all, zero_all = group_qparams(grouped(w, group), grouped(diag[None], group)[0], scheme, config)
    else:
        scale_all = torch.empty(n, k // group)
        zero_all = torch.empty(n, k // group)
    perm = torch.argsort(torch.diag(h), descending=True) if config.act_order else torch.arange(k)
    w = w[:, perm]
    h = h[perm][:, perm]
    hinv = _inverse_hessian_factor(h, config.damp).to(torch.float32)

    q = torch.zeros(n, k)
    # blocks start on group boundaries so that a group's parameters come from up-to-date columns
    if group >= config.block_size:
        block = config.block_size if group % config.block_size == 0 else group
    else:
        block = group * (config.block_size // group)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            orig = int(perm[col])
            g = orig // group
            if not (config.static_groups or config.act_order) and orig % group == 0:
                cols = torch.cat([w1[:, i:], w[:, i2:]], dim=1)[:, :group]
                scale_all[:, g], zero_all[:, g] = (t[:, 0] for t in group_qparams(
                    cols[:, None, :], diag[None, orig:orig + group], scheme, config))
            scale, zero = scale_all[:, g], zero_all[:, g]
            wc = w1[:, i]
            qc = quantize_groups(wc[:, None], scale, zero, scheme)[:, 0]
            dq = dequantize_groups(qc[:, None], scale, zero, scheme)[:, 0]
            q[:, col] = qc
            e = (wc - dq) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    inverse = torch.argsort(perm)
    q = q[:, inverse]
    qmin, qmax = scheme.qrange
    return QuantizedWeight(
        q=q.to(primitives.storage_dtype(qmin, qmax)),
        scale=scale_all.to(torch.float32),
        zero_point=None if scheme.symmetric else zero_all.to(torch.float32),
        block_size=scheme.block_size(),
        bits=scheme.bits,
        symmetric=scheme.symmetric,
    )
