"""The histogram's bin counts are those of its definition, ``floor(x * 2**shift) + bins/2`` with the product exact,
on every path that computes them: float32 products (with the -0.0 fix), float64 products, and the C++ counter
the calibration observers use. The definition is evaluated here in float64 for one histogram built in one update."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qcompiler.calibration import observers
from qcompiler.calibration.observers import ActivationObserver
from qcompiler.core.errors import CalibrationError
from qcompiler.core.histogram import Histogram
from qcompiler.lowering.kernels import native

# values whose bins are easy to get wrong: signed zeros, float32 subnormals, the extremes, bin edges
SPECIAL = [0.0, -0.0, 2.0**-149, -(2.0**-149), 1e-40, -1e-40, -3e-39, 1e-30, -1e-30, 0.5, -0.5, 1.0, -1.0,
           3.0e38, -3.0e38, 2.0**-20, -(2.0**-20)]


def _definition(x: torch.Tensor, h: Histogram) -> torch.Tensor:
    """Counts ``[channels, bins]`` of ``x`` ``[n, channels]`` on ``h``'s grid, by the definition in float64."""
    shift = math.log2(h.bins) - 1 - h.exponent.double()
    index = torch.floor(x.double() * torch.pow(2.0, shift)) + h.bins // 2
    index = index.clamp(0, h.bins - 1).long() + torch.arange(h.channels) * h.bins
    return torch.bincount(index.flatten(), minlength=h.channels * h.bins).reshape(h.channels, h.bins).double()


@st.composite
def scaled_values(draw, channels: int):
    """Float32 values of any magnitude from 2**-149 to 2**127 (one scale per channel), with special values."""
    rows = draw(st.integers(1, 40))
    bulk = draw(hnp.arrays(np.float32, (rows, channels), elements=st.floats(-1, 1, width=32)))
    scale = np.float32(2.0) ** np.array([draw(st.integers(-140, 126)) for _ in range(channels)], dtype=np.float32)
    with np.errstate(over="ignore", under="ignore"):
        values = bulk * scale
    special = np.array(draw(st.lists(st.sampled_from(SPECIAL), min_size=channels, max_size=3 * channels)),
                       dtype=np.float32)
    special = special[: len(special) // channels * channels].reshape(-1, channels)
    return torch.from_numpy(np.concatenate([values, special]))


@given(scaled_values(1), st.sampled_from([2, 256, 2048]), st.sampled_from([torch.float32, torch.float16,
                                                                           torch.bfloat16, torch.float64]))
def test_one_channel_counts_are_those_of_the_definition(x, bins, dtype):
    x = x.to(dtype) if dtype != torch.float16 else x.clamp(-6e4, 6e4).to(dtype)
    h = Histogram(1, bins)
    h.update(x)
    assert torch.equal(h.counts, _definition(x.reshape(-1, 1), h))


@given(scaled_values(3), st.sampled_from([2, 64, 1024]))
def test_per_channel_counts_are_those_of_the_definition(x, bins):
    h = Histogram(3, bins)
    h.update(x)
    assert torch.equal(h.counts, _definition(x, h))


needs_native = pytest.mark.skipif(native.unavailable_reason() is not None,
                                  reason=f"no C++ toolchain here: {native.unavailable_reason()}")


@needs_native
@given(scaled_values(1), st.sampled_from([2, 256, 2048]))
def test_the_cpp_counter_counts_as_the_definition(x, bins):
    h = Histogram(1, bins)
    h.update(x, count_bins=torch.ops.qcompiler.histogram_bins)
    assert torch.equal(h.counts, _definition(x.reshape(-1, 1), h))


@needs_native
@pytest.mark.parametrize("shift", [-200, -140, -20, -1, 0, 1, 10, 136, 200])
def test_the_cpp_counter_on_many_threads_and_a_strided_input(shift):
    """Past the parallel grain (65536 values), on a transposed view, at shifts far outside the usual range."""
    gen = torch.Generator().manual_seed(shift + 1000)
    x = torch.randn(300, 700, generator=gen) * 2.0 ** (10 - shift)
    x[0, : len(SPECIAL)] = torch.tensor(SPECIAL)
    x = x.t()
    index = (torch.floor(x.double() * 2.0**shift) + 1024).clamp(0, 2047).long()
    expected = torch.bincount(index.flatten(), minlength=2048)
    assert torch.equal(torch.ops.qcompiler.histogram_bins(x, shift, 2048), expected)


@needs_native
def test_the_cpp_counter_refuses_what_it_cannot_count():
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.qcompiler.histogram_bins(torch.zeros(4, dtype=torch.float64), 0, 256)
    for bins in (1000, 1 << 17):
        with pytest.raises(RuntimeError, match="power of two in"):
            torch.ops.qcompiler.histogram_bins(torch.zeros(4), 0, bins)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_observer_rejects_inf_and_nan_in_any_channel(bad):
    obs = ActivationObserver("model.layers.0.mlp.up_proj")
    x = torch.randn(2, 5, 8)
    x[1, 3, 6] = bad
    with pytest.raises(CalibrationError, match="model.layers.0.mlp.up_proj.*inf/NaN"):
        obs.observe(x)


def test_observer_statistics_do_not_depend_on_the_cpp_counter(monkeypatch):
    batches = [torch.randn(1, 64, 16) * s for s in (1.0, 3000.0, 1e-3)]
    batches[0][0, 0, :4] = torch.tensor([-0.0, -1e-40, 1e-40, -(2.0**-149)])
    frozen = []
    for counter in (observers._native_count_bins(2048), None):
        monkeypatch.setattr(observers, "_native_count_bins", lambda bins, counter=counter: counter)
        obs = ActivationObserver("layer", bins=2048)
        for b in batches:
            obs.observe(b)
        frozen.append(obs.freeze())
    assert torch.equal(frozen[0].hist_counts, frozen[1].hist_counts)
    assert torch.equal(frozen[0].hist_exponent, frozen[1].hist_exponent)
