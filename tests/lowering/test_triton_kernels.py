"""Triton kernels under TRITON_INTERPRET=1 on CPU tensors, against exact or float references.

Shapes are small with large tiles (the interpreter's cost grows with programs x K iterations) but
cover M=1, sizes that are not multiples of the blocks, zeros and extreme values. Every config of
each kernel's autotune list is run: results must not depend on the choice.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import float_tensors, int8_gemm_problems

from qcompiler import primitives as P
from qcompiler.lowering.kernels import reference, triton_int4, triton_int8, triton_quant
from qcompiler.lowering.kernels.autotune import Config, interpreting, m_bucket, pick_config

pytestmark = pytest.mark.skipif(not interpreting(), reason="needs TRITON_INTERPRET=1 (set by conftest)")

SMALL_INT8 = [Config(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1), Config(BLOCK_M=32, BLOCK_N=16, BLOCK_K=64, GROUP_M=2)]


def exact(a, zp, w):
    return (a.to(torch.int64) - zp) @ w.to(torch.int64).t()


@given(int8_gemm_problems(max_m=24), st.sampled_from(SMALL_INT8 + triton_int8.CONFIGS[:1]))
def test_int8_gemm_accumulates_exactly(problem, config):
    a, w, w_scale = problem
    ones = torch.ones(a.shape[0])
    out = triton_int8.int8_gemm(a, ones, w, torch.ones_like(w_scale), config=config)
    assert torch.equal(out.to(torch.int64), exact(a, 0, w))  # |acc| < 2**24: exact in fp32


@given(int8_gemm_problems(max_m=24), st.integers(0, 255), st.booleans(), st.sampled_from(SMALL_INT8))
def test_int8_gemm_epilogue_matches_the_reference(problem, zero_point, with_bias, config):
    a, w, w_scale = problem
    a_u8 = (a.to(torch.int16) + 128).to(torch.uint8)
    a_scale = torch.rand(a.shape[0], generator=torch.Generator().manual_seed(1)) + 0.01
    bias = torch.randn(w.shape[0]) if with_bias else None
    out = triton_int8.int8_gemm(a_u8, a_scale, w, w_scale, bias, a_zero_point=zero_point, config=config)
    ref = reference.int8_gemm(a_u8, zero_point, w, w_scale) * a_scale[:, None]
    if bias is not None:
        ref = ref + bias
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
def test_int8_gemm_half_outputs(out_dtype):
    a = torch.randint(-127, 128, (3, 40), dtype=torch.int8)
    w = torch.randint(-127, 128, (20, 40), dtype=torch.int8)
    scale = torch.full((20,), 1e-3)
    out = triton_int8.int8_gemm(a, torch.ones(1), w, scale, out_dtype=out_dtype, config=SMALL_INT8[0])
    assert out.dtype == out_dtype
    torch.testing.assert_close(out.float(), reference.int8_gemm(a, 0, w, scale), rtol=1e-2, atol=1e-2)


def test_int8_gemm_rejects_bad_input():
    w = torch.zeros(4, 8, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"\[M, K\] and \[N, K\]"):
        triton_int8.int8_gemm(torch.zeros(2, 9, dtype=torch.int8), torch.ones(1), w, torch.ones(4))
    with pytest.raises(TypeError, match="int8/uint8"):
        triton_int8.int8_gemm(torch.zeros(2, 8), torch.ones(1), w, torch.ones(4))
    with pytest.raises(ValueError, match="symmetric"):
        triton_int8.int8_gemm(torch.zeros(2, 8, dtype=torch.int8), torch.ones(1), w, torch.ones(4), a_zero_point=3)


@given(float_tensors((5, 77), outliers=True), st.booleans())
def test_quantize_per_token_is_bit_exact_with_the_primitives(x, with_smooth):
    smooth = torch.linspace(0.5, 2.0, 77) if with_smooth else None
    q, scale = triton_quant.quantize_per_token(x, smooth, block_k=32)
    xs = x / smooth if with_smooth else x
    block = P.per_token(2)
    ref_scale, _ = P.choose_qparams_math(xs, block, -127, 127, True)
    ref_q = P.quantize_math(xs, ref_scale, None, block, -127, 127, torch.int8)
    assert torch.equal(scale, ref_scale)
    assert torch.equal(q, ref_q)


def test_quantize_per_token_zero_rows_and_ties():
    x = torch.zeros(2, 20)
    x[1, :4] = torch.tensor([127.0, 0.5, 1.5, -2.5])  # scale 1: ties round to even
    q, scale = triton_quant.quantize_per_token(x)
    assert q[0].eq(0).all() and scale[0, 0] == torch.tensor(P.MIN_SCALE, dtype=torch.float32)
    assert q[1, :4].tolist() == [127, 0, 2, -2]


@st.composite
def int4_problems(draw):
    m = draw(st.integers(1, 20))
    group = draw(st.sampled_from([32, 64, 128]))
    k = group * draw(st.integers(1, 3))
    n = draw(st.integers(1, 40))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    q = torch.randint(0, 16, (n, k), generator=gen)
    if draw(st.booleans()):
        q[: n // 2] = 15  # extremes
    scale = torch.rand(n, k // group, generator=gen) * 0.1 + 1e-3
    zero = torch.randint(0, 16, (n, k // group), generator=gen).float()
    a = torch.randn(m, k, generator=gen) * draw(st.sampled_from([1.0, 100.0]))
    return a, triton_int4.pack_int4(q), scale, zero, group


SMALL_INT4 = [Config(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=1, SPLIT_K=1),
              Config(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=1, SPLIT_K=3)]


@given(int4_problems(), st.sampled_from(SMALL_INT4 + triton_int4.CONFIGS[:1]), st.booleans())
def test_int4_gemm_matches_the_reference(problem, config, with_bias):
    a, packed, scale, zero, group = problem
    bias = torch.randn(packed.shape[0]) if with_bias else None
    out = triton_int4.int4_gemm(a, packed, scale, zero, group, bias, config=config)
    ref = reference.int4_gemm(a, packed, scale, zero, group, bias)
    tol = 1e-5 * float(a.abs().max()) * a.shape[1] * 2
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=tol)


@given(st.integers(1, 8), st.integers(1, 16))
def test_int4_pack_round_trips(rows, half_k):
    q = torch.randint(0, 16, (rows, 2 * half_k))
    assert torch.equal(triton_int4.unpack_int4(triton_int4.pack_int4(q)).long(), q)


def test_int4_rejects_k_not_a_multiple_of_the_group():
    packed = triton_int4.pack_int4(torch.zeros(4, 96, dtype=torch.long))
    with pytest.raises(ValueError, match="not a multiple of group_size=64"):
        triton_int4.int4_gemm(torch.randn(2, 96), packed, torch.ones(4, 1), torch.zeros(4, 1), 64)


def test_int4_half_activations():
    q = torch.randint(0, 16, (24, 64))
    a = torch.randn(2, 64, dtype=torch.bfloat16)
    scale, zero = torch.full((24, 2), 0.01), torch.full((24, 2), 8.0)
    out = triton_int4.int4_gemm(a, triton_int4.pack_int4(q), scale, zero, 32, config=SMALL_INT4[0])
    assert out.dtype == torch.bfloat16
    ref = reference.int4_gemm(a.float(), triton_int4.pack_int4(q), scale, zero, 32)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


def test_pick_config_is_keyed_on_the_m_bucket_and_prefers_skinny_tiles_for_decode():
    assert m_bucket(1) == 1 and m_bucket(5) == 8 and m_bucket(512) == 512
    assert pick_config(triton_int8.CONFIGS, 1, 4096, 4096).BLOCK_M == 16
    assert pick_config(triton_int8.CONFIGS, 512, 4096, 4096).BLOCK_M == 128
    timed = pick_config(SMALL_INT8, 3, 64, 64, bench=lambda c: float(c.BLOCK_N), name="bench-test")
    assert timed.BLOCK_N == 16
