"""AWQ (Lin et al. 2023): protect the weight columns of salient input channels by scaling them up
before rounding, and clip each group's range where that lowers the output error.

The layer computes ``linear(x / s, Q(W * s))``: the same function before rounding for any positive
per-input-channel ``s``. ``s = mean|X|^alpha`` (normalized to geometric mean 1) with ``alpha``
searched on a grid in [0, 1] (``alpha = 0`` is plain round-to-nearest, so the search never does worse
than RTN on its objective). Then for each group of each output channel the clipping ratio of its range
(1.0 down to ``min_clip``) with the smallest output error is kept. Both searches score the *output*
error over all calibration tokens exactly through the Hessian ``H = X^T X``:
``sum_n d_n^T H d_n`` for the weight error ``D``; for a group, only its diagonal block of ``H``
(the cross-group terms are left out, as in the paper's per-group search). Asymmetric weights keep float
zero points (the range mapped exactly onto the grid): on SmolLM2 at 4 bits, group 64, AWQ's own integer
zero points gave perplexity 33.3 against 32.3 (compressed-tensors export rounds them and says by how much).

:func:`search_scales` finds one ``s`` for several layers that read the same input (their summed error),
optionally tied across attention heads and rounded to powers of two: what ``AWQ(foldable=True)`` needs
to fold ``1/s`` into a norm or a producer's rows (``sequential`` and ``fold``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qcompiler.config import AWQ, WeightScheme
from qcompiler.core import primitives
from qcompiler.core.ir import QuantizedWeight
from qcompiler.passes.weight_rounding.common import (
    dequantize_groups,
    fake_quant,
    group_size_of,
    grouped,
    minmax_qparams,
    output_error,
    quantize_groups,
)


@dataclass(frozen=True)
class AWQResult:
    weight: QuantizedWeight  # of W * s
    input_scale: torch.Tensor  # s [K]: the layer's input is divided by it
    alpha: float
    errors: dict  # alpha -> output error before clipping, for reports and tests


def search_scales(weights: list[torch.Tensor], hessian: torch.Tensor, act_mean: torch.Tensor,
                  schemes: list[WeightScheme], config: AWQ, tie=None, pow2: bool = False
                  ) -> tuple[float, torch.Tensor, dict]:
    """``(alpha, s, errors)``: the ``s = mean|X|^alpha`` of ``config.grid`` whose summed output error over
    ``weights`` (each ``[N_i, K]`` with its scheme, all reading the input of ``hessian`` / ``act_mean``) after
    round-to-nearest is smallest. ``tie``: a function making ``act_mean`` equal across channels that must
    share a scale; ``pow2``: every ``s`` rounded to a power of two (folds exactly into float scales)."""
    k = act_mean.shape[0]
    if hessian.shape != (k, k):
        raise ValueError(f"AWQ: Hessian {tuple(hessian.shape)} and activation means {tuple(act_mean.shape)} "
                         "do not match")
    for w in weights:
        if w.shape[1] != k:
            raise ValueError(f"AWQ: weight {tuple(w.shape)} does not read {k} input channels")
    h = hessian.to(torch.float32)
    x_mag = act_mean.to(torch.float32).clamp_min(1e-8)
    if tie is not None:
        x_mag = tie(x_mag)
    ws = [w.detach().to(torch.float32) for w in weights]
    groups = [group_size_of(scheme, k) for scheme in schemes]
    errors, best = {}, None
    for i in range(config.grid + 1):
        alpha = i / config.grid
        s = x_mag.pow(alpha)
        s = (s / (s.max() * s.min()).sqrt()).clamp(1e-4, 1e4)
        if pow2:
            s = torch.exp2(torch.round(torch.log2(s)))
        err = sum(float(output_error(fake_quant(w * s, scheme, g) / s - w, h))
                  for w, scheme, g in zip(ws, schemes, groups))
        errors[alpha] = err
        if best is None or err < best[0]:
            best = (err, alpha, s)
    return best[1], best[2], errors


def awq_quantize(weight: torch.Tensor, hessian: torch.Tensor, act_mean: torch.Tensor, scheme: WeightScheme,
                 config: AWQ | None = None, scales: torch.Tensor | None = None) -> AWQResult:
    """``weight [N, K]``, ``hessian = X^T X [K, K]``, ``act_mean = mean|X| [K]`` of the layer's inputs.
    ``scales``: use this ``s`` (found for a group of layers by :func:`search_scales`) instead of searching."""
    config = config or AWQ()
    n, k = weight.shape
    if hessian.shape != (k, k) or act_mean.shape != (k,):
        raise ValueError(f"AWQ: weight {tuple(weight.shape)}, Hessian {tuple(hessian.shape)} and activation "
                         f"means {tuple(act_mean.shape)} do not match")
    group = group_size_of(scheme, k)
    w = weight.detach().to(torch.float32)
    h = hessian.to(torch.float32)
    if scales is None:
        alpha, s, errors = search_scales([w], h, act_mean, [scheme], config)
    else:
        alpha, s, errors = float("nan"), scales.to(torch.float32), {}

    ws = grouped(w * s, group)  # [N, G, g]
    scale, zero = minmax_qparams(ws, scheme)
    if config.clip:
        # per-group error through the diagonal blocks of H, for the weight as the layer sees it (D / s)
        inv_s = grouped((1.0 / s)[None, :], group)[0]  # [G, g]
        blocks = torch.stack([h[j * group:(j + 1) * group, j * group:(j + 1) * group] for j in range(k // group)])
        best_err = None
        for i in range(config.clip_grid + 1):
            ratio = 1.0 - (1.0 - config.min_clip) * i / config.clip_grid
            sc, zp = minmax_qparams(ws, scheme, ratio)
            d = (dequantize_groups(quantize_groups(ws, sc, zp, scheme), sc, zp, scheme) - ws) * inv_s  # [N, G, g]
            err = torch.einsum("ngi,gij,ngj->ng", d, blocks, d)
            if best_err is None:
                best_err, scale, zero = err, sc, zp
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                scale = torch.where(better, sc, scale)
                zero = torch.where(better, zp, zero)
    q = quantize_groups(ws, scale, zero, scheme).reshape(n, k)
    qmin, qmax = scheme.qrange
    qw = QuantizedWeight(
        q=q.to(primitives.storage_dtype(qmin, qmax)),
        scale=scale.to(torch.float32),
        zero_point=None if scheme.symmetric else zero.to(torch.float32),
        block_size=scheme.block_size(),
        bits=scheme.bits,
        symmetric=scheme.symmetric,
    )
    return AWQResult(qw, s, alpha, errors)
