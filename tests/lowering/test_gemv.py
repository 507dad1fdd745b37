"""The C++ GEMV kernels of the decode step (lowering/kernels/cpu_gemv.cpp) and the lowering that picks them."""

import pytest
import torch
from graphs import tiny_llama

import qcompiler
from qcompiler.lowering.int8 import GEMV_KERNEL
from qcompiler.lowering.kernels import native, reference

pytestmark = pytest.mark.skipif(native.unavailable_reason() is not None,
                                reason=f"no C++ toolchain here: {native.unavailable_reason()}")


def test_the_kernels_run_on_torchs_threads():
    # built with OpenMP: ATen's parallel_for spreads the output channels over torch's threads (without it,
    # it is a plain loop and a decode step's GEMVs ran on one core)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.ops.qcompiler.gemv_threads(64) == 2
        torch.set_num_threads(1)
        assert torch.ops.qcompiler.gemv_threads(64) == 1
    finally:
        torch.set_num_threads(threads)


# the larger ones split over threads, each reading 4 runs of rows side by side (their lengths shortened where two
# runs would start at one offset within a page: 3072 x 576) with the rows left over one at a time
@pytest.mark.parametrize("m,n,k", [(1, 32, 64), (3, 17, 70), (8, 48, 576), (1, 5, 1), (2, 7, 130), (1, 13, 1536),
                                   (2, 3072, 576), (1, 1001, 200)])
@pytest.mark.parametrize("zero_point", [0, 128, 37])
def test_int8_gemv_is_exact(m, n, k, zero_point):
    gen = torch.Generator().manual_seed(m * n + k)
    x = torch.randint(0, 256, (m, k), generator=gen, dtype=torch.int32).to(torch.uint8)
    w = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int32).to(torch.int8)
    scale = torch.rand(n, generator=gen) + 0.01
    out = torch.ops.qcompiler.int8_gemv(x, zero_point, w, w.sum(1, dtype=torch.int32), scale)
    assert torch.equal(out, reference.int8_gemm(x, zero_point, w, scale))


@pytest.mark.parametrize("x_value,zero_point,w_value", [(255, 0, -128), (0, 255, -128), (255, 0, 127), (0, 255, 127)])
def test_int8_gemv_is_exact_at_the_extremes(x_value, zero_point, w_value):
    # the largest products and sums the kernel can meet (CPUs without VNNI sum (x - zero_point) as int16 pairs)
    x = torch.full((2, 1536), x_value, dtype=torch.uint8)
    w = torch.full((40, 1536), w_value, dtype=torch.int8)
    scale = torch.ones(40)
    out = torch.ops.qcompiler.int8_gemv(x, zero_point, w, w.sum(1, dtype=torch.int32), scale)
    assert torch.equal(out, reference.int8_gemm(x, zero_point, w, scale))
    assert out[0, 0] == (x_value - zero_point) * w_value * 1536


def test_int8_gemv_refuses_a_zero_point_outside_uint8():
    x, w = torch.zeros(1, 64, dtype=torch.uint8), torch.zeros(32, 64, dtype=torch.int8)
    with pytest.raises(RuntimeError, match=r"zero point must be in \[0, 255\], got 300"):
        torch.ops.qcompiler.int8_gemv(x, 300, w, w.sum(1, dtype=torch.int32), torch.ones(32))


@pytest.mark.parametrize("m,n,k", [(1, 32, 64), (2, 7, 576), (8, 49, 100), (2, 3072, 576), (1, 1001, 200)])
def test_int8_weight_gemv_is_the_float_product(m, n, k):
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(m, k, generator=gen)
    w = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int32).to(torch.int8)
    scale = torch.rand(n, generator=gen) * 0.01
    out = torch.ops.qcompiler.int8_weight_gemv(x, w, scale).double()
    expected = x.double() @ w.double().t() * scale.double()
    # each row of x is rounded to fixed point with qmax levels (the most an exact int32 sum of K int16 x
    # int8 products allows): every input is off by at most half a step, so the product by its weights' sum
    qmax = min(32767, (2**31 - 1) // (127 * k))
    step = x.abs().amax(1, keepdim=True).double() / qmax
    bound = 0.5 * step * (w.double().abs().sum(1) * scale.double()) + 1e-6 * expected.abs()
    assert ((out - expected).abs() <= bound).all()
    assert (out - expected).abs().max() > 0 or k == 1  # it is the fixed-point kernel, not a float copy


def _int4_case(m: int, n: int, k: int, group: int, seed: int):
    """Activations [m, k], 4-bit codes [n, k] and their group scales and integer zero points."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen)
    q = torch.randint(0, 16, (n, k), generator=gen)
    scale = torch.rand(n, k // group, generator=gen) * 0.01 + 1e-3
    zero = torch.randint(0, 16, (n, k // group), generator=gen).float()
    return x, q, scale, zero


@pytest.mark.parametrize("m,n,k,group", [(1, 16, 64, 32), (3, 7, 576, 32), (3, 9, 576, 64), (8, 32, 256, 256),
                                         (1, 40, 1536, 128), (2, 7, 192, 192)])
def test_int4_gemv_matches_the_reference(m, n, k, group):
    x, q, scale, zero = _int4_case(m, n, k, group, seed=k + group)
    packed = reference.pack_int4(q)
    out = torch.ops.qcompiler.int4_gemv(x, packed, scale, zero, group).double()
    w = (q.double() - zero.double().repeat_interleave(group, 1)) * scale.double().repeat_interleave(group, 1)
    expected = x.double() @ w.t()
    # x is rounded to int16 fixed point per row (qmax levels: the most an exact int32 sum of a group
    # allows): every input is off by at most half a step, the rest is float32 rounding of the group sums
    qmax = min(32767, (2**31 - 1) // (15 * group))
    step = x.abs().amax(1, keepdim=True).double() / qmax
    bound = 0.5 * step * w.abs().sum(1) + 1e-6 * (x.double().abs() @ w.abs().t())
    assert ((out - expected).abs() <= bound).all()
    # and far closer to the exact product than ATen's int4 kernel's bf16 activations could be
    assert (out - expected).abs().max() < 0.01 * (x.double().abs().amax() * w.abs().sum(1).max() * 2**-9)


@pytest.mark.parametrize("m,n,k,group", [(1, 32, 64, 32), (3, 64, 576, 32), (2, 96, 576, 64), (8, 64, 256, 256),
                                         (1, 64, 1536, 128), (2, 32, 2048, 2048), (1, 32, 36, 12),
                                         (2, 224, 576, 64), (1, 3072, 576, 64)])
def test_int4_gemv_on_the_tiled_layout_computes_what_the_row_layout_does(m, n, k, group):
    # the same fixed-point arithmetic (int16 activations with 32767 levels, exact integer sums, one float
    # multiply-add per group or per 256 channels): equal to the row kernel up to float32 summation order;
    # groups wider than 256 channels (2048) and a group of 3 steps of 4 (12) take the flush and odd-step paths
    x, q, scale, zero = _int4_case(m, n, k, group, seed=k + group + n)
    tiled, scale_t, zero_t = reference.pack_int4_tiled(q, scale, zero)
    out = torch.ops.qcompiler.int4_gemv_tiled(x, tiled, scale_t, zero_t, group).double()
    w = (q.double() - zero.double().repeat_interleave(group, 1)) * scale.double().repeat_interleave(group, 1)
    expected = x.double() @ w.t()
    step = x.abs().amax(1, keepdim=True).double() / 32767
    bound = 0.5 * step * w.abs().sum(1) + 1e-6 * (x.double().abs() @ w.abs().t())
    assert ((out - expected).abs() <= bound).all()
    rows = torch.ops.qcompiler.int4_gemv(x, reference.pack_int4(q), scale, zero, group).double()
    torch.testing.assert_close(out, rows, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("m,n,k,group", [(1, 224, 576, 64), (3, 480, 1536, 128), (2, 3072, 576, 64),
                                         (1, 160, 2048, 2048), (2, 224, 576, 12), (1, 96, 36, 12)])
def test_the_tiled_int4_gemv_gives_each_tile_the_outputs_it_gets_alone(m, n, k, group):
    # a thread reads several tiles side by side (kStreams, then the 1-3 left over): each tile's 32 outputs are
    # the same bit for bit as a call on that tile alone, wherever it falls (two threads: 7 tiles on one, a run
    # of 4 and 3 left over; 15 tiles as 8 + 7; 96 as 48 + 48; flushes within groups of 2048; groups of 3 steps
    # of 4 channels, the odd step, with 4 and with 3 tiles side by side)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        _each_tile_alone(m, n, k, group)
    finally:
        torch.set_num_threads(threads)


def _each_tile_alone(m, n, k, group):
    x, q, scale, zero = _int4_case(m, n, k, group, seed=n + k)
    tiled, scale_t, zero_t = reference.pack_int4_tiled(q, scale, zero)
    out = torch.ops.qcompiler.int4_gemv_tiled(x, tiled, scale_t, zero_t, group)
    alone = torch.cat([torch.ops.qcompiler.int4_gemv_tiled(x, tiled[t : t + 1], scale_t[t : t + 1],
                                                           zero_t[t : t + 1], group) for t in range(n // 32)], dim=1)
    assert torch.equal(out, alone)


@pytest.mark.parametrize("group", [256, 2048])
def test_the_tiled_int4_gemv_sums_the_largest_codes_without_overflow(group):
    # every activation at the largest fixed-point value (32767) and every code 15: each int32 lane's sum is
    # at its largest before a flush (64 steps of 4 channels: 125.8 M of 2^31), so a missed flush overflows
    k = 2048
    q = torch.full((32, k), 15)
    scale, zero = torch.full((32, k // group), 1e-3), torch.zeros(32, k // group)
    out = torch.ops.qcompiler.int4_gemv_tiled(torch.ones(2, k), *reference.pack_int4_tiled(q, scale, zero), group)
    torch.testing.assert_close(out, torch.full((2, 32), 15 * k * 1e-3), rtol=1e-5, atol=0)


def _op_cases():
    gen = torch.Generator().manual_seed(5)
    q = torch.randint(0, 16, (64, 128), generator=gen)
    scale, zero = torch.rand(64, 4, generator=gen) * 0.01, torch.full((64, 4), 8.0)
    w8 = torch.randint(-127, 128, (48, 128), dtype=torch.int8, generator=gen)
    x = torch.randn(2, 1, 128, generator=gen)
    return {
        "int8_gemv": (torch.randint(0, 256, (2, 1, 128), dtype=torch.uint8, generator=gen), 128, w8,
                      w8.sum(1, dtype=torch.int32), torch.rand(48, generator=gen)),
        "int8_weight_gemv": (x, w8, torch.rand(48, generator=gen)),
        "int4_gemv": (x, reference.pack_int4(q), scale, zero, 32),
        "int4_gemv_tiled": (x, *reference.pack_int4_tiled(q, scale, zero), 32),
        "decode_attention": (torch.randn(1, 4, 1, 16, generator=gen), torch.randn(1, 2, 8, 16, generator=gen),
                             torch.randn(1, 2, 8, 16, generator=gen), torch.ones(1, 1, 1, 8, dtype=torch.bool), 0.25),
    }


@pytest.mark.parametrize("op", sorted(_op_cases()))
def test_the_fake_kernels_give_the_real_outputs_shapes(op):
    # Inductor plans its buffers from the fake (meta) kernels: a wrong width there breaks the compiled graph
    # (the tiled layout's tile height is read from reference.INT4_TILE, not written twice)
    torch.library.opcheck(getattr(torch.ops.qcompiler, op).default, _op_cases()[op], test_utils=("test_faketensor",))


def test_the_tiled_int4_layout_is_checked():
    with pytest.raises(ValueError, match="multiple of 32"):
        reference.pack_int4_tiled(torch.zeros(16, 64, dtype=torch.long), torch.ones(16, 2), torch.zeros(16, 2))
    tiled, scale, zero = reference.pack_int4_tiled(torch.zeros(32, 64, dtype=torch.long), torch.ones(32, 2),
                                                   torch.zeros(32, 2))
    with pytest.raises(RuntimeError, match="group 6 does not fit"):
        torch.ops.qcompiler.int4_gemv_tiled(torch.zeros(1, 64), tiled, scale, zero, 6)
    with pytest.raises(RuntimeError, match="x has K=32"):
        torch.ops.qcompiler.int4_gemv_tiled(torch.zeros(1, 32), tiled, scale, zero, 32)
    with pytest.raises(RuntimeError, match="no input channels"):  # not a division by zero in the thread split
        torch.ops.qcompiler.int4_gemv_tiled(torch.zeros(1, 0), torch.zeros(1, 0, dtype=torch.uint8),
                                            torch.zeros(1, 0, 32), torch.zeros(1, 0, 32), 4)


@pytest.mark.inductor
def test_a_decode_shaped_graph_runs_the_gemv_and_matches_the_reference():
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 1))  # one fixed row: the decode step's shape
    qcompiler.clear_reports()
    torch._dynamo.reset()
    with torch.inference_mode():
        ref = torch.compile(model, backend="qcompiler", options={"kernels": "reference"})(ids).logits
        torch._dynamo.reset()
        fast = torch.compile(model, backend="qcompiler")(ids).logits
    rep = qcompiler.last_report()
    assert {kernel for kernel, _ in rep.kernel_of.values()} == {GEMV_KERNEL}
    assert rep.plan.kernels == {GEMV_KERNEL: 14}
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)


def test_a_graph_with_symbolic_rows_keeps_the_library_gemm():
    model = tiny_llama()
    qcompiler.clear_reports()
    torch._dynamo.reset()
    with torch.inference_mode():
        compiled = torch.compile(model, backend="qcompiler", dynamic=True)
        compiled(torch.randint(0, 128, (1, 5)))
    kernels = {kernel for kernel, _ in qcompiler.last_report().kernel_of.values()}
    assert GEMV_KERNEL not in kernels and any("FBGEMM" in k for k in kernels)
