"""Hypothesis strategies for quantization tests: shapes, granularities, outlier-heavy tensors."""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qcompiler.core import primitives

bits = st.integers(min_value=2, max_value=8)


@st.composite
def float_tensors(draw, shape, dtype=np.float32, outliers: bool = True):
    """Finite tensors of ``shape``: a normal-ish bulk, optionally a few channels scaled up a lot."""
    elements = st.floats(min_value=-4.0, max_value=4.0, allow_nan=False, allow_infinity=False, width=32)
    array = draw(hnp.arrays(dtype, shape, elements=elements))
    if outliers and shape[-1] > 1 and draw(st.booleans()):
        channel = draw(st.integers(0, shape[-1] - 1))
        factor = draw(st.sampled_from([10.0, 100.0, 2400.0]))
        array[..., channel] *= factor
    return torch.from_numpy(np.ascontiguousarray(array))


GRANULARITIES = ("per_tensor", "per_channel", "per_group", "per_token")


@st.composite
def shapes_and_block(draw, granularities=GRANULARITIES, ndims=(1, 2, 3), max_groups: int = 4):
    """A shape and a block size of one of ``granularities`` for it: per-tensor, per-channel on any axis,
    per-group along the last dimension, per-token (one block per row of the last dimension)."""
    kind = draw(st.sampled_from(granularities))
    usable = [n for n in ndims if n >= (1 if kind in ("per_tensor", "per_channel") else 2)]
    ndim = draw(st.sampled_from(usable))
    shape = [draw(st.integers(1, 6)) for _ in range(ndim - 1)] + [draw(st.integers(1, 48))]
    if kind == "per_tensor":
        block = primitives.per_tensor(ndim)
    elif kind == "per_channel":
        block = primitives.per_channel(ndim, draw(st.integers(-ndim, ndim - 1)))
    elif kind == "per_group":
        group = draw(st.sampled_from([2, 4, 8, 32]))
        shape[-1] = group * draw(st.integers(1, max_groups))
        block = primitives.per_group(ndim, group)
    else:
        block = primitives.per_token(ndim)
    return tuple(shape), block


@st.composite
def tensors_and_block(draw, granularities=GRANULARITIES, ndims=(1, 2, 3), degenerate: bool = False):
    """A tensor and a block size of one of ``granularities``; with ``degenerate``, a tensor that is
    all zeros, one constant (tiny to huge, either sign), or constant within each block."""
    shape, block = draw(shapes_and_block(granularities, ndims))
    if not degenerate:
        return draw(float_tensors(shape)), block
    style = draw(st.sampled_from(["zeros", "constant", "constant_per_block"]))
    constants = st.sampled_from([0.75, -2.0, 1e-30, -3e-9, 1e6, -123.456, 2.0**-20])
    if style == "zeros":
        return torch.zeros(shape), block
    if style == "constant":
        return torch.full(shape, draw(constants)), block
    per_block = [1 if b == -1 else s // b for s, b in zip(shape, block)]
    values = torch.tensor(draw(st.lists(constants, min_size=math.prod(per_block), max_size=math.prod(per_block))))
    repeat = [s if b == -1 else b for s, b in zip(shape, block)]
    return torch.kron(values.reshape(per_block), torch.ones(repeat)).float(), block


@st.composite
def int8_gemm_problems(draw, max_m: int = 40):
    """int8 activations [M, K], int8 weights [N, K] and per-channel scales, with extremes."""
    m = draw(st.integers(1, max_m))
    k = draw(st.integers(1, 96))
    n = draw(st.integers(1, 48))
    style = draw(st.sampled_from(["random", "extreme", "zeros"]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    if style == "zeros":
        x = torch.zeros(m, k, dtype=torch.int8)
    elif style == "extreme":
        x = (torch.randint(0, 2, (m, k), generator=gen) * 254 - 127).to(torch.int8)
    else:
        x = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8)
    w = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    if style == "extreme":
        w = (torch.randint(0, 2, (n, k), generator=gen) * 254 - 127).to(torch.int8)
    scale = torch.rand(n, generator=gen) * 0.1 + 1e-4
    return x, w, scale
