"""Hypothesis strategies for quantization tests: shapes, granularities, outlier-heavy tensors."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qcompiler import primitives

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


@st.composite
def weights_and_block(draw, max_rows: int = 8, max_groups: int = 4):
    """A 2-D weight and a block size of each weight granularity."""
    rows = draw(st.integers(1, max_rows))
    kind = draw(st.sampled_from(["per_tensor", "per_channel_0", "per_channel_1", "per_group"]))
    if kind == "per_group":
        group = draw(st.sampled_from([2, 4, 8, 32]))
        cols = group * draw(st.integers(1, max_groups))
        block = primitives.per_group(2, group)
    else:
        cols = draw(st.integers(1, 48))
        block = {
            "per_tensor": primitives.per_tensor(2),
            "per_channel_0": primitives.per_channel(2, 0),
            "per_channel_1": primitives.per_channel(2, 1),
        }[kind]
    return draw(float_tensors((rows, cols))), block


@st.composite
def activations_and_block(draw):
    """A [B, T, K] activation with a per-token or per-tensor block size."""
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 6)), draw(st.integers(1, 40)))
    block = draw(st.sampled_from([primitives.per_token(3), primitives.per_tensor(3)]))
    return draw(float_tensors(shape)), block


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
