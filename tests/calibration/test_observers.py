import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import float_tensors

from qcompiler.calibration.observers import ActivationObserver
from qcompiler.core import primitives
from qcompiler.core.errors import CalibrationError
from qcompiler.core.histogram import Histogram
from qcompiler.core.ranges import MSE_GRID, kl_clip, weight_range

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


# --- brute-force references for the histogram-based activation ranges -------------------------------


def _reference_kl(mags: np.ndarray, i: int, levels: int, eps: float = 1e-4) -> float:
    """KL(P || Q) for a threshold of ``i`` bins of the |x| histogram ``mags``, as kl_clip documents it:
    P folds the clipped mass into the last kept bin; Q spreads each of ``levels`` near-equal chunks of
    the kept bins evenly over its non-empty bins; Q's empty bins get ``eps`` before renormalizing."""
    p = mags[:i].copy()
    p[-1] += mags[i:].sum()
    kept = mags[:i]
    q = np.zeros(i)
    chunk_of_bin = np.arange(i) * levels // i
    for chunk in range(levels):
        members = chunk_of_bin == chunk
        nonempty = members & (kept > 0)
        if nonempty.any():
            q[nonempty] = kept[members].sum() / nonempty.sum()
    if q.sum() == 0:
        return float("inf")  # every kept bin is empty: Q cannot represent P at all
    p, q = p / p.sum(), q / q.sum()
    q = np.where(q == 0, eps, q)
    q = q / q.sum()
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


def _kl_data(kind: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    if kind == "gaussian_with_outliers":
        x = torch.randn(20000, generator=gen)
        x[:6] = torch.tensor([40.0, -35.0, 30.0, 50.0, -45.0, 20.0])
        return x
    if kind == "laplace":
        u = torch.rand(20000, generator=gen) - 0.5
        return -0.3 * u.sign() * torch.log1p(-2 * u.abs())  # inverse CDF of Laplace(0, 0.3)
    if kind == "uniform":
        return torch.rand(20000, generator=gen) * 2 - 1
    if kind == "sparse":  # clusters with empty bins between them
        return torch.randint(-3, 4, (5000,), generator=gen).float() * 0.25 + torch.randn(5000, generator=gen) * 1e-3
    if kind == "away_from_zero":  # small thresholds keep only empty bins
        return torch.randn(5000, generator=gen) * 1e-3 + 0.5
    if kind == "coarse":  # a histogram with fewer |x| bins than KL_MIN_BINS: one candidate
        return torch.randn(5000, generator=gen)
    raise ValueError(kind)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("kind", ["gaussian_with_outliers", "laplace", "uniform", "sparse", "away_from_zero", "coarse"])
def test_kl_threshold_is_the_argmin_of_the_divergence_over_the_candidates(kind, bits, monkeypatch):
    from qcompiler.core import ranges as observers

    bins = 64 if kind == "coarse" else 2048
    h = Histogram(1, bins)
    h.update(_kl_data(kind))
    evaluated = []
    real_kl = observers._kl_for_threshold

    def spy(p_full, i, levels):
        evaluated.append(i)
        return real_kl(p_full, i, levels)

    monkeypatch.setattr(observers, "_kl_for_threshold", spy)
    threshold = float(kl_clip(h, bits)[0])
    width = float(h.edges_scale[0])
    counts = h.counts[0].numpy()
    mags = counts[bins // 2:] + counts[:bins // 2][::-1]
    levels = 2 ** (bits - 1)
    top = int(np.nonzero(mags)[0].max()) + 1
    # the candidates: evenly spaced bin counts from the bin holding the largest |x| downwards
    assert evaluated[0] == top and len(set(evaluated)) == len(evaluated)
    assert len(set(np.diff(evaluated))) <= 1
    assert min(evaluated) >= min(observers.KL_MIN_BINS, top)
    if kind == "coarse":
        assert evaluated == [top]
    divergences = np.array([_reference_kl(mags, i, levels) for i in evaluated])
    ours = np.array([real_kl(torch.from_numpy(mags), i, levels) for i in evaluated])
    np.testing.assert_allclose(ours, divergences, rtol=1e-9, atol=1e-12)  # inf where both are inf
    chosen = round(threshold / width)
    assert threshold == chosen * width and chosen in evaluated
    assert divergences[evaluated.index(chosen)] <= divergences.min() + 1e-12
    # ties go to the widest threshold (the first candidate evaluated)
    assert chosen == evaluated[int(np.argmin(divergences))]
    if kind == "gaussian_with_outliers":
        assert threshold < 20.0  # the divergence clips the outliers


@pytest.mark.parametrize("max_candidates", [256, 64])
def test_kl_evaluates_at_most_max_candidates_thresholds(max_candidates, monkeypatch):
    from qcompiler.core import ranges as observers

    h = Histogram(1, 2048)
    h.update(_kl_data("gaussian_with_outliers"))
    evaluated = []
    real_kl = observers._kl_for_threshold
    monkeypatch.setattr(observers, "_kl_for_threshold",
                        lambda p, i, levels: evaluated.append(i) or real_kl(p, i, levels))
    kl_clip(h, 8, max_candidates=max_candidates)
    # a stride of span // max_candidates evaluated up to twice as many (337 for 256 here)
    assert len(evaluated) <= max_candidates
    assert evaluated[0] == int(h.counts[0, 1024:].add(h.counts[0, :1024].flip(-1)).nonzero().max()) + 1


def _observed(batches):
    obs = ActivationObserver("layer")
    for batch in batches:
        obs.observe(batch)
    return obs.freeze()


@st.composite
def calibration_batches(draw):
    """Two to four [rows, 8] batches at different scales, so the histogram coarsens between them."""
    n = draw(st.integers(2, 4))
    return [draw(float_tensors((draw(st.integers(1, 24)), 8))) * draw(st.sampled_from([0.01, 1.0, 30.0]))
            for _ in range(n)]


def _histogram_mse(centers, counts, lo, hi, bits, symmetric) -> float:
    """Squared error of quantize-dequantizing every bin centre with range [lo, hi], weighted by its count."""
    qmin, qmax = primitives.quant_range(bits, symmetric)
    scale, zp = primitives.qparams_from_range(torch.tensor(lo), torch.tensor(hi), qmin, qmax, symmetric)
    scale, zp = float(scale), float(zp)
    dq = (np.clip(np.round(centers / scale) + zp, qmin, qmax) - zp) * scale
    return float(np.sum(counts * (dq - centers) ** 2))


@given(calibration_batches(), st.sampled_from([2, 4, 8]), st.booleans())
def test_activation_mse_range_is_the_argmin_over_the_clipping_grid(batches, bits, symmetric):
    r = _observed(batches)
    h = r.histogram()
    counts, width = h.counts[0].numpy(), float(h.edges_scale[0])
    centers = (np.arange(h.bins) - h.bins // 2 + 0.5) * width
    x = torch.cat([b.flatten() for b in batches]).double()
    assert counts.sum() == x.numel()
    assert np.all(np.abs(x.numpy()[:, None] - centers[counts > 0]).min(1) <= width / 2)  # bins hold the data
    lo_all, hi_all = float(x.min()), float(x.max())
    errors = {step / MSE_GRID: _histogram_mse(centers, counts, lo_all * step / MSE_GRID, hi_all * step / MSE_GRID,
                                              bits, symmetric) for step in range(MSE_GRID, 0, -1)}
    best = min(errors.values())
    lo, hi = r.range("mse", bits, symmetric)
    assert _histogram_mse(centers, counts, lo, hi, bits, symmetric) <= best * (1 + 1e-9) + 1e-300
    widest_best = max(ratio for ratio, err in errors.items() if err <= best * (1 + 1e-12))
    assert (lo, hi) == pytest.approx((lo_all * widest_best, hi_all * widest_best), rel=1e-9, abs=1e-300)


@given(calibration_batches(), st.sampled_from([75.0, 90.0, 99.0, 99.9, 99.99]))
def test_activation_percentile_range_is_within_a_bin_of_numpy(batches, q):
    r = _observed(batches)
    width = float(r.histogram().edges_scale[0])
    x = torch.cat([b.flatten() for b in batches]).double().numpy()
    lo, hi = r.range("percentile", 8, False, percentile=q)
    assert hi == pytest.approx(max(np.percentile(x, q), 0.0), abs=width)
    assert lo == pytest.approx(min(np.percentile(x, 100 - q), 0.0), abs=width)
    assert min(x.min(), 0.0) <= lo <= 0.0 <= hi <= max(x.max(), 0.0)
