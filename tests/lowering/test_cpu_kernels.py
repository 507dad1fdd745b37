from unittest import mock

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from strategies import int8_gemm_problems

from qcompiler.lowering import ops
from qcompiler.lowering.kernels import cpu, reference

pytestmark = pytest.mark.skipif(not cpu.available(), reason="FBGEMM is not available on this CPU")


def exact_int8_gemm(x, w, scale):
    return (x.to(torch.int64) @ w.to(torch.int64).t()).to(torch.float32) * scale


@given(int8_gemm_problems())
def test_cpu_int8_gemm_equals_the_integer_reference(problem):
    x, w, scale = problem
    handle = cpu.register_weight(w, scale)
    out = torch.ops.qcompiler.int8_gemm(x, 0, w, scale, handle)
    expected = exact_int8_gemm(x, w, scale)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(reference.int8_gemm(x, 0, w, scale), expected, rtol=1e-6, atol=0)


@given(int8_gemm_problems(), st.integers(0, 255))
def test_cpu_uint8_gemm_with_zero_point_equals_the_integer_reference(problem, zero_point):
    x, w, scale = problem
    x_u8 = (x.to(torch.int16) + 128).to(torch.uint8)
    out = torch.ops.qcompiler.int8_gemm(x_u8, zero_point, w, scale, cpu.register_weight(w, scale))
    expected = ((x_u8.to(torch.int64) - zero_point) @ w.to(torch.int64).t()).to(torch.float32) * scale
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(reference.int8_gemm(x_u8, zero_point, w, scale), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("m", [1, cpu.SMALL_M, cpu.SMALL_M + 1, 64])
def test_both_row_regimes_agree_and_keep_leading_dims(m):
    x = torch.randint(-127, 128, (2, m, 40), dtype=torch.int8)
    w = torch.randint(-127, 128, (24, 40), dtype=torch.int8)
    scale = torch.rand(24) + 0.01
    out = torch.ops.qcompiler.int8_gemm(x, 0, w, scale, cpu.register_weight(w, scale))
    assert out.shape == (2, m, 24)
    torch.testing.assert_close(out, exact_int8_gemm(x, w, scale), rtol=1e-6, atol=0)


def test_unknown_handle_repacks_instead_of_using_another_weight():
    w1 = torch.randint(-127, 128, (8, 16), dtype=torch.int8)
    w2 = torch.randint(-127, 128, (8, 16), dtype=torch.int8)
    scale = torch.ones(8)
    h1 = cpu.register_weight(w1, scale)
    x = torch.randint(-127, 128, (3, 16), dtype=torch.int8)
    before = cpu.repacks
    out = torch.ops.qcompiler.int8_gemm(x, 0, w2, scale, h1)  # handle names w1: must not be used
    torch.testing.assert_close(out, exact_int8_gemm(x, w2, scale), rtol=1e-6, atol=0)
    assert cpu.repacks == before + 1


def test_int8_gemm_checks_its_inputs():
    w = torch.zeros(4, 8, dtype=torch.int8)
    with pytest.raises(TypeError, match="int8"):
        torch.ops.qcompiler.int8_gemm(torch.zeros(2, 8), 0, w, torch.ones(4), 0)
    with pytest.raises(ValueError, match="does not match"):
        torch.ops.qcompiler.int8_gemm(torch.zeros(2, 9, dtype=torch.int8), 0, w, torch.ones(4), 0)
    with pytest.raises(ValueError, match="symmetric"):
        torch.ops.qcompiler.int8_gemm(torch.zeros(2, 8, dtype=torch.int8), 3, w, torch.ones(4), 0)


def test_int8_gemm_opcheck():
    x = torch.randint(-127, 128, (3, 16), dtype=torch.int8)
    w = torch.randint(-127, 128, (8, 16), dtype=torch.int8)
    torch.library.opcheck(ops.int8_gemm, (x, 0, w, torch.rand(8) + 0.1, cpu.register_weight(w, torch.ones(8))))


def _saturating_pair_gemm(x_u8: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """What vpmaddubsw + vpmaddwd compute: int16-saturated sums of adjacent u8*s8 products."""
    k = x_u8.shape[1]
    pad = k % 2
    xp = torch.nn.functional.pad(x_u8.to(torch.int64), (0, pad))
    wp = torch.nn.functional.pad(w.to(torch.int64), (0, pad))
    prods = xp[:, None, :] * wp[None, :, :]  # [M, N, K]
    pairs = prods.reshape(*prods.shape[:2], -1, 2).sum(-1).clamp(-32768, 32767)
    return pairs.sum(-1)


@given(int8_gemm_problems(max_m=6))
def test_pair_limited_weights_never_saturate_int16_pair_sums(problem):
    x, w, _ = problem
    x_u8 = x.to(torch.int64) + 128  # FBGEMM's view of our activations (zero point 128)
    limited, _ = cpu.limit_pair_sums(w, cpu.PAIR_LIMIT)
    exact = x_u8 @ limited.to(torch.int64).t()
    assert torch.equal(_saturating_pair_gemm(x_u8, limited), exact)


def test_full_range_weights_do_saturate_in_the_simulation():
    x_u8 = torch.full((1, 2), 255)
    w = torch.full((1, 2), 127, dtype=torch.int8)
    assert _saturating_pair_gemm(x_u8, w).item() == 32767 != 2 * 255 * 127


def test_pair_limit_changes_only_pairs_over_the_limit():
    w = torch.tensor([[127, 127, 10, -20, -100, 60, 5]], dtype=torch.int8)
    limited, changed = cpu.limit_pair_sums(w, 128)
    assert changed == 2
    assert limited.tolist() == [[64, 64, 10, -20, -84, 44, 5]]
    assert (limited[:, :6].abs().reshape(-1, 2).sum(-1) <= 128).all()


def test_probe_reports_saturation_consistently_with_the_cpu():
    # CPUs with VNNI/AMX accumulate in int32 and must not need the split packing.
    if cpu.has_int8_dot():
        assert not cpu.saturates()


@given(int8_gemm_problems(), st.integers(0, 255))
def test_the_split_packing_of_saturating_cpus_equals_the_integer_reference(problem, zero_point):
    # full-range weights packed as on a CPU whose int16 pair sums saturate: FBGEMM's pair-limited part plus
    # the excess in float give the exact product (on this CPU too, whether it saturates or not)
    x, w, scale = problem
    assume(w.shape[1] >= 2)
    w = w.clone()
    w[:, :2] = 127  # at least one pair over the limit
    with mock.patch.object(cpu, "saturates", lambda: True):
        packed = cpu._pack(w, scale)
    assert packed.excess is not None
    limited, _ = cpu.limit_pair_sums(w, cpu.PAIR_LIMIT)
    assert torch.equal(packed.excess.to_dense(), w.float() - limited.float())  # what the limit took off
    x_u8 = (x.to(torch.int16) + 128).to(torch.uint8)
    out = cpu._fbgemm_gemm(x_u8, zero_point, packed)
    x_in = x_u8.to(torch.int64) - zero_point
    expected = (x_in @ w.to(torch.int64).t()).to(torch.float64) * scale.double()
    size = (x_in.abs() @ w.to(torch.int64).abs().t()).to(torch.float64) * scale.double()
    assert ((out.double() - expected).abs() <= 1e-6 * size + 1e-6 * expected.abs()).all()


needs_onednn = pytest.mark.skipif(not cpu.use_onednn(), reason="the oneDNN int8 path needs AVX512-VNNI or AMX")


@needs_onednn
def test_onednn_path_is_exact_for_int8_activations():
    torch.manual_seed(0)
    x = torch.randint(-128, 128, (3 * cpu.SMALL_M, 96), dtype=torch.int8)
    w = torch.randint(-127, 128, (40, 96), dtype=torch.int8)
    scale = torch.rand(40) + 0.5
    out = torch.ops.qcompiler.int8_gemm(x, 0, w, scale, cpu.register_weight(w, scale))
    torch.testing.assert_close(out, exact_int8_gemm(x, w, scale), rtol=1e-6, atol=0)


@needs_onednn
def test_onednn_is_only_given_uint8_activations(monkeypatch):
    # int8 activations make oneDNN fall back to its reference GEMM (~1800x slower): they are shifted.
    seen = []
    real = cpu._onednn_qlinear

    def spy(x_u8, zero_point, packed):
        seen.append(x_u8.dtype)
        return real(x_u8, zero_point, packed)

    monkeypatch.setattr(cpu, "_onednn_qlinear", spy)
    w = torch.randint(-127, 128, (16, 32), dtype=torch.int8)
    scale = torch.ones(16)
    x = torch.randint(-128, 128, (2 * cpu.SMALL_M, 32), dtype=torch.int8)
    torch.ops.qcompiler.int8_gemm(x, 0, w, scale, cpu.register_weight(w, scale))
    assert seen == [torch.uint8]
