"""Triton kernels under TRITON_INTERPRET=1 on CPU tensors, against exact or float references.

Shapes are small with large tiles (the interpreter's cost grows with programs x K iterations) but
cover M=1, sizes that are not multiples of the blocks, zeros and extreme values. The property tests
draw from small test configs and the first default one; one test runs every config of each kernel's
autotune list on one problem (int8: equal bit for bit; int4: equal within fp32 summation order),
so results do not depend on the autotuner's choice.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import float_tensors, int8_gemm_problems

from qcompiler.core import primitives as P
from qcompiler.lowering.kernels import autotune, reference, triton_int4, triton_int8, triton_quant
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


@st.composite
def token_rows(draw):
    """Activations ``[M, K]`` (M from 1, K from 1 to 300, fp32/fp16/bf16, outlier channels) and an
    optional positive SmoothQuant scale ``[K]`` in the same dtype."""
    m = draw(st.sampled_from([1, 2, 5]))
    k = draw(st.integers(1, 300))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    x = draw(float_tensors((m, k), outliers=True)).to(dtype)
    smooth = None
    if draw(st.booleans()):
        smooth = (draw(float_tensors((k,), outliers=False)).abs() + 0.25).to(dtype)
    return x, smooth


@given(token_rows(), st.sampled_from([16, 128, 1024]))
def test_quantize_per_token_is_bit_exact_with_the_primitives(rows, block_k):
    x, smooth = rows
    q, scale = triton_quant.quantize_per_token(x, smooth, block_k=block_k)
    xs = x.float() / smooth.float() if smooth is not None else x.float()
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


def test_results_do_not_depend_on_the_autotune_choice():
    gen = torch.Generator().manual_seed(0)
    m, n, k = 33, 40, 100  # several row tiles for the skinny configs; N and K not multiples of any block
    a = torch.randint(0, 256, (m, k), generator=gen, dtype=torch.uint8)
    w = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    a_scale, w_scale, bias = torch.rand(m, generator=gen) + 0.01, torch.rand(n, generator=gen) * 0.1, torch.randn(n)
    int8_outs = [triton_int8.int8_gemm(a, a_scale, w, w_scale, bias, a_zero_point=3, config=c)
                 for c in triton_int8.CONFIGS]
    assert all(torch.equal(out, int8_outs[0]) for out in int8_outs[1:])
    int8_ref = reference.int8_gemm(a, 3, w, w_scale) * a_scale[:, None] + bias
    torch.testing.assert_close(int8_outs[0], int8_ref, rtol=1e-6, atol=1e-6)

    group = 64
    q = torch.randint(0, 16, (n, 2 * group), generator=gen)
    packed = triton_int4.pack_int4(q)
    scale = torch.rand(n, 2, generator=gen) * 0.1 + 1e-3
    zero = torch.randint(0, 16, (n, 2), generator=gen).float()
    x = torch.randn(m, 2 * group, generator=gen)
    int4_outs = [triton_int4.int4_gemm(x, packed, scale, zero, group, bias, config=c) for c in triton_int4.CONFIGS]
    w_float = reference.unpack_int4(packed).float()
    magnitude = float((x.abs() @ (w_float + zero.repeat_interleave(group, 1)).t()).max() * scale.max())
    for out in int4_outs[1:]:  # only fp32 summation order differs (split-K, tile sizes)
        torch.testing.assert_close(out, int4_outs[0], rtol=0, atol=1e-6 * magnitude)
    torch.testing.assert_close(int4_outs[0], reference.int4_gemm(x, packed, scale, zero, group, bias),
                               rtol=0, atol=1e-6 * magnitude)

    rows = torch.randn(3, 300, generator=gen) * 5
    quant_outs = [triton_quant.quantize_per_token(rows, block_k=b) for b in (16, 128, 1024)]
    assert all(torch.equal(q_, quant_outs[0][0]) and torch.equal(s_, quant_outs[0][1]) for q_, s_ in quant_outs)


def _fake_gpu_timer(timed: list):
    """Stands in for ``autotune.timer_for`` on a GPU: runs each launch once and says the later ones are faster."""
    def timer_for(device):
        def time_launch(launch):
            timed.append(launch())
            return -float(len(timed))
        return time_launch
    return timer_for


def test_first_call_on_a_gpu_times_every_config_and_later_calls_reuse_the_choice(monkeypatch):
    timed = []
    monkeypatch.setattr(autotune, "_cache", {})
    monkeypatch.setattr(autotune, "timer_for", _fake_gpu_timer(timed))
    a = torch.randint(-127, 128, (3, 40), dtype=torch.int8)
    w = torch.randint(-127, 128, (20, 40), dtype=torch.int8)
    expected = exact(a, 0, w).to(torch.float32)
    out = triton_int8.int8_gemm(a, torch.ones(1), w, torch.ones(20))
    assert len(timed) == len(triton_int8.CONFIGS)  # every config timed, each on the real problem
    assert all(torch.equal(t, expected) for t in timed) and torch.equal(out, expected)
    # the last config "timed fastest": chosen over the heuristic's skinny tile for M=3
    assert autotune._cache[("int8", tuple(triton_int8.CONFIGS), 4, 20, 40)] == triton_int8.CONFIGS[-1]
    triton_int8.int8_gemm(torch.cat([a, a[:1]]), torch.ones(1), w, torch.ones(20))  # M=4, same bucket: no timing
    assert len(timed) == len(triton_int8.CONFIGS)

    timed.clear()
    x = torch.randn(1, 64)
    packed, scale, zero = triton_int4.pack_int4(torch.randint(0, 16, (8, 64))), torch.rand(8, 2), torch.zeros(8, 2)
    out = triton_int4.int4_gemm(x, packed, scale, zero, 32)
    assert len(timed) == len(triton_int4.CONFIGS)
    torch.testing.assert_close(out, reference.int4_gemm(x, packed, scale, zero, 32), rtol=1e-5, atol=1e-5)
    assert autotune._cache[("int4 g32", tuple(triton_int4.CONFIGS), 1, 8, 64)] == triton_int4.CONFIGS[-1]


def test_only_cuda_tensors_outside_the_interpreter_are_timed(monkeypatch):
    assert autotune.timer_for(torch.device("cpu")) is None
    assert autotune.timer_for(torch.device("cuda")) is None  # interpreting: do_bench needs a driver
    assert autotune.gpu_bench(torch.device("cuda"), lambda cfg: None) is None
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert autotune.timer_for(torch.device("cpu")) is None
    assert callable(autotune.timer_for(torch.device("cuda")))
    assert callable(autotune.gpu_bench(torch.device("cuda"), lambda cfg: None))


def test_pick_config_is_keyed_on_the_m_bucket_and_prefers_skinny_tiles_for_decode():
    assert m_bucket(1) == 1 and m_bucket(5) == 8 and m_bucket(512) == 512
    assert pick_config(triton_int8.CONFIGS, 1, 4096, 4096).BLOCK_M == 16
    assert pick_config(triton_int8.CONFIGS, 512, 4096, 4096).BLOCK_M == 128
    timed = pick_config(SMALL_INT8, 3, 64, 64, bench=lambda c: float(c.BLOCK_N), name="bench-test")
    assert timed.BLOCK_N == 16
