"""Round-to-nearest (RTN) weight quantization, the baseline every other rounding method is judged by."""

from __future__ import annotations

import torch

from qcompiler.config import WeightScheme
from qcompiler.core import primitives
from qcompiler.core.ir import QuantizedWeight
from qcompiler.core.ranges import weight_range
from qcompiler.passes.weight_rounding.common import scheme_qparams


def round_to_nearest(weight: torch.Tensor, scheme: WeightScheme) -> QuantizedWeight:
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
    return QuantizedWeight(
        q=q,
        scale=scale,
        zero_point=None if scheme.symmetric else zero_point,
        block_size=block_size,
        bits=scheme.bits,
        symmetric=scheme.symmetric,
    )
