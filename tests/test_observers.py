import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import float_tensors

from qcompiler import primitives
from qcompiler.errors import CalibrationError
from qcompiler.observers import MSE_GRID, ActivationObserver, Histogram, kl_clip, weight_range

shapes = st.tuples(st.integers(1, 6), st.integers(1, 40))


@given(float_tensors((5, 7)), float_tensors((3, 7)), st.sampled_from([1.0, 1e-3, 50.0]))
def test_histogram_merge_equals_histogram_of_all_values(a, b, scale_b):
    b = b * scale_b
    merged = Histogram(1, 256)
    merged.update(a)
    other = Histogram(1, 256)
    other.update(b)
    merged = merged.merge(other)
    direct = Histogram(1, 256)
    direct.update(torch.cat([a.flatten(), b.flatten()]))
    sequential = Histogram(1, 256)
    sequential.update(a)
    sequential.update(b)
    for h in (merged, sequential):
        assert torch.equal(h.exponent, direct.exponent)
        assert torch.equal(h.counts, direct.counts)
    assert direct.total.item() == a.numel() + b.numel()


@given(float_tensors((9, 4), outliers=True), float_tensors((5, 4), outliers=True))
def test_per_channel_histograms_merge_exactly_with_their_own_ranges(a, b):
    h1, h2, both = Histogram(4, 64), Histogram(4, 64), Histogram(4, 64)
    h1.update(a)
    h2.update(b * 1000)
    both.update(torch.cat([a, b * 1000]))
    merged = h1.merge(h2)
    assert torch.equal(merged.counts, both.counts) and torch.equal(merged.exponent, both.exponent)
    assert torch.equal(both.total, torch.full((4,), 14.0, dtype=torch.float64))


@given(float_tensors((64, 16), outliers=True), st.sampled_from([50.1, 90.0, 99.0, 99.9, 99.99]))
def test_histogram_percentile_is_within_a_bin_of_numpy(x, q):
    h = Histogram(1, 2048)
    h.update(x)
    ours = float(h.percentile(q)[0])
    ref = float(np.percentile(x.double().numpy(), q))
    width = float(h.edges_scale[0])
    # numpy interpolates between order statistics, we interpolate inside a bin: one bin apart at most
    assert abs(ours - ref) <= 2 * width + 1e-12


def test_histogram_rejects_bins_that_are_not_a_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        Histogram(1, 1000)


def _brute_force_mse_ratio(row: torch.Tensor, bits: int, symmetric: bool) -> float:
    qmin, qmax = primitives.quant_range(bits, symmetric)
    lo, hi = row.min().double(), row.max().double()
    best, best_ratio = float("inf"), 1.0
    for step in range(MSE_GRID, 0, -1):
        r = step / MSE_GRID
        scale, zp = primitives.qparams_from_range(lo * r, hi * r, qmin, qmax, symmetric)
        q = torch.clamp(torch.round(row.double() / scale.double()) + zp.double(), qmin, qmax)
        err = float(((q - zp.double()) * scale.double() - row.double()).pow(2).sum())
        if err < best:
            best, best_ratio = err, r
    return best_ratio


@given(float_tensors((4, 32), outliers=True), st.sampled_from([4, 8]), st.booleans())
def test_weight_mse_clip_is_the_argmin_over_the_grid(w, bits, symmetric):
    lo, hi = weight_range(w, primitives.per_channel(2, 0), "mse", bits, symmetric)
    for row in range(w.shape[0]):
        ratio = _brute_force_mse_ratio(w[row], bits, symmetric)
        expected_hi = max(float(w[row].max()) * ratio, 0.0)
        expected_lo = min(float(w[row].min()) * ratio, 0.0)
        assert float(hi[row, 0]) == pytest.approx(expected_hi, rel=1e-6, abs=1e-12)
        assert float(lo[row, 0]) == pytest.approx(expected_lo, rel=1e-6, abs=1e-12)


@given(float_tensors((3, 64)), st.sampled_from([99.0, 99.9]))
def test_weight_percentile_matches_numpy_per_channel(w, q):
    lo, hi = weight_range(w, primitives.per_channel(2, 0), "percentile", 8, True, percentile=q)
    ref_hi = np.percentile(w.double().numpy(), q, axis=1)
    ref_lo = np.percentile(w.double().numpy(), 100 - q, axis=1)
    np.testing.assert_allclose(hi[:, 0].numpy(), np.maximum(ref_hi, 0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(lo[:, 0].numpy(), np.minimum(ref_lo, 0), rtol=1e-6, atol=1e-7)


def test_kl_clips_a_heavy_tail_and_keeps_a_bounded_distribution():
    gen = torch.Generator().manual_seed(0)
    uniform = torch.rand(20000, generator=gen) * 2 - 1
    h = Histogram(1, 2048)
    h.update(uniform)
    t_uniform = float(kl_clip(h, 8)[0])
    assert 0.9 <= t_uniform <= 1.0 + float(h.edges_scale[0])
    tail = torch.randn(20000, generator=gen)
    tail[:5] = torch.tensor([400.0, -350.0, 300.0, 500.0, -450.0])
    h = Histogram(1, 2048)
    h.update(tail)
    t_tail = float(kl_clip(h, 8)[0])
    assert t_tail < 100.0


def test_activation_observer_tracks_min_max_ema_and_channels():
    obs = ActivationObserver("layer", bins=256, momentum=0.5)
    a = torch.tensor([[[-1.0, 2.0], [0.5, -0.25]]])
    b = torch.tensor([[[3.0, -4.0]]])
    obs.observe(a)
    obs.observe(b)
    r = obs.freeze()
    assert (float(r.min), float(r.max)) == (-4.0, 3.0)
    assert float(r.ema_min) == pytest.approx(0.5 * -1.0 + 0.5 * -4.0)
    assert float(r.ema_max) == pytest.approx(0.5 * 2.0 + 0.5 * 3.0)
    assert r.channel_min.tolist() == [-1.0, -4.0] and r.channel_max.tolist() == [3.0, 2.0]
    assert r.batches == 2 and float(r.hist_counts.sum()) == 6
    for method in ("minmax", "ema", "percentile", "mse", "kl"):
        lo, hi = r.range(method, 8, False)
        assert -4.0 <= lo <= 0.0 <= hi <= 3.0, method


def test_observer_names_the_layer_on_nan():
    obs = ActivationObserver("model.layers.3.mlp.down_proj")
    with pytest.raises(CalibrationError, match="model.layers.3.mlp.down_proj"):
        obs.observe(torch.tensor([1.0, float("nan")]))
