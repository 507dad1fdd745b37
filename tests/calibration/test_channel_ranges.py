"""Per-channel ranges: activation observers per input channel, and the KL observer on weights."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import float_tensors

import qcompiler
from qcompiler.calibration.observers import ActivationObserver
from qcompiler.core.errors import CalibrationError
from qcompiler.core.histogram import Histogram
from qcompiler.core.ranges import OBSERVERS, kl_clip, weight_range


def _observe(batches, **kwargs) -> ActivationObserver:
    obs = ActivationObserver("layer", **kwargs)
    for x in batches:
        obs.observe(x)
    return obs


def _heavy_batches(seed=0, channels=6):
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-1, 1, channels)
    out = []
    for _ in range(3):
        out.append(torch.randn(40, channels, generator=g) * scales)
    out[0][0, -1] = 80.0  # one outlier in the last channel (1 value of 120)
    return out


@given(st.lists(float_tensors((7, 5), outliers=True), min_size=1, max_size=4))
def test_channel_min_max_and_moving_averages_match_a_brute_force_pass(batches):
    obs = _observe(batches, momentum=0.25)
    ranges = obs.freeze()
    stacked = torch.cat(batches)
    lo, hi = ranges.channel_range("minmax", 8, False)
    assert torch.equal(lo, stacked.amin(0).clamp_max(0)) and torch.equal(hi, stacked.amax(0).clamp_min(0))
    ema_lo, ema_hi = batches[0].amin(0), batches[0].amax(0)
    for b in batches[1:]:
        ema_lo, ema_hi = 0.75 * ema_lo + 0.25 * b.amin(0), 0.75 * ema_hi + 0.25 * b.amax(0)
    lo, hi = ranges.channel_range("ema", 8, False)
    torch.testing.assert_close(lo, ema_lo.clamp_max(0))
    torch.testing.assert_close(hi, ema_hi.clamp_min(0))


@pytest.mark.parametrize("method", ["percentile", "mse", "kl"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_each_channel_gets_the_range_an_observer_of_that_channel_alone_gets(method, symmetric):
    """The per-channel histogram of channel c is the per-tensor histogram of channel c's values."""
    batches = _heavy_batches()
    channel = _observe(batches, bins=512, channel_bins=512).freeze()
    lo, hi = channel.channel_range(method, 8, symmetric, percentile=99.0)
    for c in range(batches[0].shape[1]):
        alone = _observe([b[:, c:c + 1] for b in batches], bins=512).freeze()
        expected = alone.range(method, 8, symmetric, percentile=99.0)
        assert (float(lo[c]), float(hi[c])) == pytest.approx(expected, rel=1e-6, abs=1e-9), (method, c)


def test_per_channel_clipping_clips_the_outlier_of_its_channel():
    ranges = _observe(_heavy_batches(), channel_bins=1024).freeze()
    _, hi_max = ranges.channel_range("minmax", 8, True)
    for method in ("percentile", "mse", "kl"):
        lo, hi = ranges.channel_range(method, 8, True, percentile=99.0)
        assert (hi <= hi_max + 1e-6).all() and (lo <= 0).all() and (hi >= 0).all()
        if method != "mse":  # MSE keeps it: clipping one value to 40 costs more than 8-bit steps of 0.63
            assert hi[-1] < 0.5 * hi_max[-1], method  # the 80.0 outlier of the last channel is clipped
        assert (hi[:-1] > 0.5 * hi_max[:-1]).all(), method  # the other channels keep most of their range


@settings(max_examples=25)
@given(float_tensors((200, 3), outliers=True), st.sampled_from([90.0, 99.0, 99.9]))
def test_channel_percentile_matches_numpy_within_a_bin(x, q):
    ranges = _observe([x], channel_bins=1024).freeze()
    lo, hi = ranges.channel_range("percentile", 8, False, percentile=q)
    hist = ranges.channel_histogram()
    width = hist.edges_scale.float()
    values = x.double().numpy()
    for c in range(3):
        exp_hi = min(max(np.percentile(values[:, c], q), 0.0), values[:, c].max())
        exp_lo = max(min(np.percentile(values[:, c], 100 - q), 0.0), values[:, c].min())
        assert abs(float(hi[c]) - max(exp_hi, 0.0)) <= float(width[c]) + 1e-6
        assert abs(float(lo[c]) - min(exp_lo, 0.0)) <= float(width[c]) + 1e-6


def test_histogram_ranges_without_channel_histograms_say_how_to_get_them():
    ranges = _observe(_heavy_batches()).freeze()
    assert ranges.channel_hist_counts is None
    for method in ("percentile", "mse", "kl"):
        with pytest.raises(ValueError, match="channel_bins"):
            ranges.channel_range(method, 8, True)
    with pytest.raises(ValueError, match="unknown observer 'p99'"):
        ranges.channel_range("p99", 8, True)
    with pytest.raises(ValueError, match="power of two"):
        ActivationObserver("layer", channel_bins=100)


def test_a_layer_input_that_changes_width_is_a_clear_error():
    obs = ActivationObserver("model.fc", channel_bins=64)
    obs.observe(torch.randn(4, 8))
    with pytest.raises(CalibrationError, match="'model.fc' has 6 channels on batch 1, 8 before"):
        obs.observe(torch.randn(4, 6))


def test_calibrate_keeps_channel_histograms_that_survive_save_and_load(tmp_path):
    from graphs import tiny_llama

    model = tiny_llama()
    batches = [torch.randint(0, 128, (1, 32), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    stats = qcompiler.calibrate(model, batches, "w8a8-static", progress=False, channel_bins=256)
    assert stats.info["channel_bins"] == 256
    name = "model.layers.0.mlp.down_proj"
    assert stats[name].channel_hist_counts.shape == (96, 256)
    stats.save(tmp_path / "s")
    loaded = qcompiler.CalibrationStats.load(tmp_path / "s")
    for method in OBSERVERS:
        for a, b in zip(stats[name].channel_range(method, 8, False), loaded[name].channel_range(method, 8, False)):
            assert torch.equal(a, b), method
    # the static ranges do not depend on the per-channel histograms
    plain = qcompiler.calibrate(model, batches, "w8a8-static", progress=False)
    assert plain[name].channel_hist_counts is None
    assert plain[name].range("mse", 8, False) == stats[name].range("mse", 8, False)


def test_statistics_saved_before_the_optional_fields_still_load(tmp_path):
    from graphs import tiny_llama

    model = tiny_llama()
    stats = qcompiler.calibrate(model, [torch.randint(0, 128, (1, 16))], "w8a8-static", progress=False)
    folder = stats.save(tmp_path / "s")
    meta_path = next(p for p in folder.iterdir() if p.suffix == ".json")
    meta = json.loads(meta_path.read_text())
    for section in meta.values():  # drop what the older format did not write
        if isinstance(section, dict):
            for entry in section.values():
                if isinstance(entry, dict):
                    entry.pop("optional", None)
    meta_path.write_text(json.dumps(qcompiler.core.integrity.seal(meta)))  # as that format wrote it, sealed
    old = qcompiler.CalibrationStats.load(folder)
    name = "model.layers.0.mlp.down_proj"
    assert old[name].channel_ema_min is None and old[name].range("minmax", 8, False) == stats[name].range("minmax", 8, False)
    with pytest.raises(ValueError, match="calibrate again"):
        old[name].channel_range("ema", 8, False)


# --- weights ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
def test_weight_kl_range_is_the_kl_threshold_of_each_channel_histogram(bits):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 300, generator=g)
    w[2, 7] = 40.0  # a heavy outlier in channel 2
    lo, hi = weight_range(w, (1, 300), "kl", bits, True)
    for c in range(6):
        h = Histogram(1, 2048)
        h.update(w[c])
        t = float(kl_clip(h, bits, max_candidates=64)[0])
        assert float(hi[c, 0]) == pytest.approx(min(float(w[c].max()), t), rel=1e-6)
        assert float(lo[c, 0]) == pytest.approx(max(float(w[c].min()), -t), rel=1e-6)
    assert float(hi[2, 0]) < 20.0  # the outlier is clipped


def test_weight_kl_is_a_recipe_observer_that_compiles():
    recipe = qcompiler.Recipe(name="w8a8-kl-weights", weight=qcompiler.WeightScheme(bits=8, observer="kl"))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 32)).eval()
    x = torch.randn(4, 64)
    torch._dynamo.reset()
    qcompiler.clear_reports()
    with torch.inference_mode():
        ref = model(x)
        out = torch.compile(model, backend="qcompiler", options={"recipe": recipe})(x)
    assert len(qcompiler.last_report().quantized) == 2
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.99


def test_weight_kl_is_per_channel_or_per_tensor_only_and_needs_two_candidates():
    with pytest.raises(ValueError, match="per channel or per tensor only"):
        qcompiler.WeightScheme(bits=4, granularity="per_group", group_size=32, observer="kl")
    h = Histogram(1, 256)
    h.update(torch.randn(100))
    with pytest.raises(ValueError, match="max_candidates must be at least 2"):
        kl_clip(h, 8, max_candidates=1)
    with pytest.raises(ValueError, match="channel_bins must be 0"):
        qcompiler.calibrate(torch.nn.Linear(4, 4), [torch.randn(2, 4)], "w8a8-static", channel_bins=100)
