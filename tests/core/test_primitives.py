import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import bits, tensors_and_block

from qcompiler.core import primitives as P


def reference_qparams(x: np.ndarray, block_size, qmin, qmax, symmetric):
    """numpy reference: ranges from float32 values, scale and zero point in float32."""
    x = x.astype(np.float32)
    blocks = [s if b == -1 else b for s, b in zip(x.shape, block_size)]
    blocked = []
    for s, b in zip(x.shape, blocks):
        blocked += [s // b, b]
    xb = x.reshape(blocked)
    axes = tuple(range(1, len(blocked), 2))
    out_shape = [s // b for s, b in zip(x.shape, blocks)]
    if symmetric:
        absmax = np.abs(xb).max(axis=axes).reshape(out_shape)
        scale = np.maximum(absmax / np.float32((qmax - qmin) / 2), np.float32(P.MIN_SCALE)).astype(np.float32)
        return scale, np.zeros(out_shape, np.int32)
    lo = np.minimum(xb.min(axis=axes), 0).reshape(out_shape).astype(np.float32)
    hi = np.maximum(xb.max(axis=axes), 0).reshape(out_shape).astype(np.float32)
    scale = np.maximum((hi - lo) / np.float32(qmax - qmin), np.float32(P.MIN_SCALE)).astype(np.float32)
    zp = np.clip(qmin - np.round(lo / scale), qmin, qmax).astype(np.int32)
    return scale, zp


def per_element(values: np.ndarray, shape, block_size) -> np.ndarray:
    """One scale (or zero point) per block, repeated over the block's elements, in float64."""
    blocks = [s if b == -1 else b for s, b in zip(shape, block_size)]
    return np.kron(values.astype(np.float64), np.ones(blocks))


def reference_quantize(x: np.ndarray, scale, zp, block_size, qmin, qmax):
    """numpy reference in float64: clamp(round_half_even(x / scale) + zp)."""
    s_full, z_full = per_element(scale, x.shape, block_size), per_element(zp, x.shape, block_size)
    return np.clip(np.round(x.astype(np.float64) / s_full) + z_full, qmin, qmax)


# Every property below runs over all granularities (per-tensor, per-channel on any axis of 1-3-D
# tensors, per-group, per-token), bit widths 2..8, symmetric and asymmetric.


@given(tensors_and_block(), bits, st.booleans())
def test_qparams_and_integers_match_a_float64_numpy_reference_exactly(xb, n_bits, symmetric):
    x, block = xb
    x64 = x.double()
    qmin, qmax = P.quant_range(n_bits, symmetric)
    scale, zp = P.choose_qparams(x64, block, n_bits, symmetric)
    ref_scale, ref_zp = reference_qparams(x64.numpy(), block, qmin, qmax, symmetric)
    np.testing.assert_array_equal(scale.numpy(), ref_scale)
    np.testing.assert_array_equal(zp.numpy(), ref_zp)
    q = P.quantize(x64, scale, zp, block, n_bits, symmetric)
    np.testing.assert_array_equal(q.numpy().astype(np.float64),
                                  reference_quantize(x64.numpy(), ref_scale, ref_zp, block, qmin, qmax))
    dq = P.dequantize(q, scale, zp, block, torch.float64)
    ref_dq = ((q.numpy().astype(np.float64) - per_element(ref_zp, x.shape, block))
              * per_element(ref_scale, x.shape, block))
    np.testing.assert_array_equal(dq.numpy(), ref_dq)


@given(tensors_and_block(), bits, st.booleans())
def test_round_trip_error_is_at_most_half_a_step(xb, n_bits, symmetric):
    x, block = xb
    scale, zp = P.choose_qparams(x, block, n_bits, symmetric)
    q = P.quantize(x, scale, zp, block, n_bits, symmetric)
    dq = P.dequantize(q, scale, zp, block, torch.float32)
    # every value lies inside its block's range, so the only error is rounding
    step = torch.from_numpy(per_element(scale.numpy(), x.shape, block))
    assert torch.all((dq.double() - x.double()).abs() <= step / 2 * (1 + 1e-5) + 1e-7)


@given(tensors_and_block(), bits, st.booleans())
def test_requantizing_dequantized_values_is_idempotent(xb, n_bits, symmetric):
    x, block = xb
    scale, zp = P.choose_qparams(x, block, n_bits, symmetric)
    q = P.quantize(x, scale, zp, block, n_bits, symmetric)
    dq = P.dequantize(q, scale, zp, block, torch.float32)
    assert torch.equal(P.quantize(dq, scale, zp, block, n_bits, symmetric), q)


@given(tensors_and_block(), bits, st.booleans())
def test_integer_values_stay_in_range_and_dtype(xb, n_bits, symmetric):
    x, block = xb
    qmin, qmax = P.quant_range(n_bits, symmetric)
    scale, zp = P.choose_qparams(x, block, n_bits, symmetric)
    q = P.quantize(x, scale, zp, block, n_bits, symmetric)
    assert q.dtype == (torch.int8 if symmetric else torch.uint8) and q.shape == x.shape
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    assert torch.all(scale > 0) and list(scale.shape) == P.scale_shape(x.shape, block)


@given(tensors_and_block(degenerate=True), bits, st.booleans())
def test_degenerate_tensors_get_safe_scales(xb, n_bits, symmetric):
    # all zeros, one constant, a constant per block: finite scales, no NaN, and each constant comes back
    # (to float32 rounding), or as 0 when it is below the smallest scale
    x, block = xb
    scale, zp = P.choose_qparams(x, block, n_bits, symmetric)
    assert torch.isfinite(scale).all() and torch.all(scale >= P.MIN_SCALE)
    out = P.fake_quantize(x, block, n_bits, symmetric)
    assert torch.isfinite(out).all()
    err = (out.double() - x.double()).abs()
    assert torch.all(err <= torch.maximum(x.double().abs() * 1e-6, torch.tensor(P.MIN_SCALE)))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_are_a_clear_error(bad):
    x = torch.randn(4, 8)
    x[1, 2] = bad
    with pytest.raises(ValueError, match="inf/NaN"):
        P.choose_qparams(x, P.per_channel(2, 0))


def test_group_size_must_divide_the_dimension():
    with pytest.raises(ValueError, match="not a multiple of its block length 5"):
        P.choose_qparams(torch.randn(4, 12), P.per_group(2, 5))


def test_block_size_length_must_match_the_tensor():
    with pytest.raises(ValueError, match="one block length"):
        P.choose_qparams(torch.randn(4, 12), (1,))


def test_bits_outside_2_to_8_are_rejected():
    with pytest.raises(ValueError, match="between 2 and 8"):
        P.quant_range(9, True)


def test_per_token_scale_is_one_per_row():
    x = torch.randn(2, 5, 16)
    scale, _ = P.choose_qparams(x, P.per_token(3))
    assert scale.shape == (2, 5, 1)
    assert torch.allclose(scale, x.abs().amax(-1, keepdim=True) / 127)


def test_bits_per_weight_counts_scales_and_zero_points():
    assert P.bits_per_weight((4096, 4096), P.per_group(2, 128), 4, scale_bits=16, zero_point_bits=8) == 4.1875
    assert P.bits_per_weight((576, 576), P.per_channel(2, 0), 8, scale_bits=32) == 8 + 32 / 576
    assert P.bits_per_weight((10, 10), P.per_tensor(2), 8, scale_bits=32) == 8 + 32 / 100


def test_custom_ops_pass_opcheck():
    x = torch.randn(3, 4, 16)
    block = list(P.per_token(3))
    scale, zp = torch.ops.qcompiler.choose_qparams(x, block, -127, 127, True)
    torch.library.opcheck(torch.ops.qcompiler.choose_qparams.default, (x, block, -127, 127, True))
    torch.library.opcheck(torch.ops.qcompiler.quantize.default, (x, scale, None, block, -127, 127, torch.int8))
    q = torch.ops.qcompiler.quantize(x, scale, None, block, -127, 127, torch.int8)
    torch.library.opcheck(torch.ops.qcompiler.dequantize.default, (q, scale, None, block, torch.float32))
    w = torch.randn(8, 32)
    wblock = list(P.per_group(2, 8))
    ws, wz = torch.ops.qcompiler.choose_qparams(w, wblock, 0, 15, False)
    torch.library.opcheck(torch.ops.qcompiler.quantize.default, (w, ws, wz, wblock, 0, 15, torch.uint8))
