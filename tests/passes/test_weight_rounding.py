"""GPTQ, AWQ and HQQ on single layers, against round-to-nearest on the same data."""

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompiler.config import AWQ, GPTQ, HQQ, WeightScheme
from qcompiler.core.errors import ConfigError
from qcompiler.lowering.kernels import reference
from qcompiler.passes.weight_rounding import round_to_nearest
from qcompiler.passes.weight_rounding.awq import awq_quantize
from qcompiler.passes.weight_rounding.common import minmax_qparams, output_error, quantize_groups
from qcompiler.passes.weight_rounding.gptq import gptq_quantize
from qcompiler.passes.weight_rounding.hqq import hqq_quantize, lp_error

W4G32 = WeightScheme(bits=4, granularity="per_group", group_size=32, symmetric=False)


def _layer(seed: int, n: int = 48, k: int = 128, rows: int = 512, outliers: bool = True):
    """A weight and inputs like an LLM layer's: correlated channels, a few large ones."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    mix = torch.randn(k, k, generator=gen) / k**0.5 + torch.eye(k)
    x = torch.randn(rows, k, generator=gen) @ mix
    if outliers:
        x[:, torch.randperm(k, generator=gen)[:4]] *= 20
    return w, x


def _out_err(qw, w, x, input_scale=None):
    w_hat = qw.dequantize()
    if input_scale is not None:
        w_hat = w_hat / input_scale
    return float(output_error(w_hat - w, x.t() @ x))


W2G64 = WeightScheme(bits=2, granularity="per_group", group_size=64, symmetric=True)
W4G128 = WeightScheme(bits=4, granularity="per_group", group_size=128, symmetric=False)  # one group per row
WIDE = [
    W4G32,
    WeightScheme(bits=4, granularity="per_group", group_size=64, symmetric=True),
    WeightScheme(bits=3, granularity="per_group", group_size=32, symmetric=False),
    WeightScheme(bits=4, granularity="per_channel", symmetric=False),
    W4G128,
]
W2G32 = WeightScheme(bits=2, granularity="per_group", group_size=32, symmetric=False)
W2_PER_CHANNEL = WeightScheme(bits=2, granularity="per_channel", symmetric=True)
TWO_BIT = [W2G64, W2G32, W2_PER_CHANNEL]
schemes = st.sampled_from(WIDE + TWO_BIT)
GPTQ_CONFIGS = [GPTQ(), GPTQ(act_order=True), GPTQ(static_groups=True)]
# At 2 bits, groups whose grid is taken from the weight as GPTQ has updated it (static_groups=False)
# lose to RTN on most layers (see the xfail below), and grids fixed up front without activation order
# still lose on a few per cent of layers in groups of 32 (asymmetric); activation order always wins.
gptq_cases = st.one_of(
    st.tuples(st.sampled_from(WIDE + [W2_PER_CHANNEL]), st.sampled_from(GPTQ_CONFIGS)),
    st.tuples(st.sampled_from(TWO_BIT), st.just(GPTQ(act_order=True))),
    st.tuples(st.sampled_from([W2G64, W2_PER_CHANNEL]), st.just(GPTQ(static_groups=True))),
)


@settings(max_examples=12, deadline=None, derandomize=True)  # a statistical property: fixed examples
@given(seed=st.integers(0, 10_000), case=gptq_cases)
def test_gptq_beats_rtn_on_the_layer_output(seed, case):
    scheme, config = case
    w, x = _layer(seed)
    h = x.t() @ x
    gptq = gptq_quantize(w, h, scheme, config)
    rtn = round_to_nearest(w, scheme)
    assert gptq.q.shape == rtn.q.shape and gptq.scale.shape == rtn.scale.shape
    qmin, qmax = scheme.qrange
    assert int(gptq.q.min()) >= qmin and int(gptq.q.max()) <= qmax
    assert _out_err(gptq, w, x) < _out_err(rtn, w, x)


@pytest.mark.xfail(strict=True, reason="known limitation, reported: at 2 bits GPTQ's per-group grids taken from the "
                                       "updated weight (static_groups=False) lose to RTN on most of these layers")
def test_gptq_with_grids_from_the_updated_weight_beats_rtn_at_2_bits():
    scheme = W2G32
    for seed in range(3):
        w, x = _layer(seed)
        assert _out_err(gptq_quantize(w, x.t() @ x, scheme, GPTQ()), w, x) < _out_err(round_to_nearest(w, scheme), w, x)


@pytest.mark.parametrize("scheme", [W4G32, W2G64], ids=["4bit-g32-asym", "2bit-g64-sym"])
def test_gptq_static_groups_without_act_order_fix_every_grid_from_the_original_weight(scheme):
    w, x = _layer(4)
    h = x.t() @ x
    g = w.reshape(w.shape[0], -1, scheme.group_size)
    scale, zero = minmax_qparams(g, scheme, float_zero=False)
    static = gptq_quantize(w, h, scheme, GPTQ(static_groups=True))
    assert torch.equal(static.scale, scale)
    assert static.zero_point is None if scheme.symmetric else torch.equal(static.zero_point, zero)
    dynamic = gptq_quantize(w, h, scheme, GPTQ())
    # without static groups only the first group's grid comes from the original weight: later groups
    # take theirs from the weight as updated by the error feedback of the columns before them
    assert torch.equal(dynamic.scale[:, 0], scale[:, 0]) and not torch.equal(dynamic.scale[:, 1:], scale[:, 1:])
    rtn = round_to_nearest(w, scheme)
    assert _out_err(static, w, x) < _out_err(rtn, w, x)
    assert not torch.equal(static.q, rtn.q)  # the error feedback moved some integers off round-to-nearest


@pytest.mark.parametrize("config", [GPTQ(act_order=True, clip_grid=20), GPTQ(clip_grid=20)], ids=["act-order", "plain"])
def test_gptq_clipping_search_lowers_the_layer_output_error_and_keeps_the_grid(config):
    # the searched ranges lie inside min-max (ratios <= 1) and give a smaller output error than min-max
    # ranges on every one of these layers (each group's ratio minimizes its Hessian-diagonal-weighted error)
    for seed in range(3):
        w, x = _layer(seed, n=64, k=256)
        h = x.t() @ x
        plain = gptq_quantize(w, h, W4G32, dataclasses.replace(config, clip_grid=0))
        clipped = gptq_quantize(w, h, W4G32, config)
        assert _out_err(clipped, w, x) < _out_err(plain, w, x)
        qmin, qmax = W4G32.qrange
        assert int(clipped.q.min()) >= qmin and int(clipped.q.max()) <= qmax
        if config.act_order:  # grids from the original weight: never wider than its min-max ones
            assert (clipped.scale <= plain.scale * (1 + 1e-6)).all() and (clipped.scale < plain.scale).any()


def test_gptq_clipping_search_is_checked():
    with pytest.raises(ConfigError, match="clip_grid"):
        GPTQ(clip_grid=-1)
    with pytest.raises(ConfigError, match="min_clip"):
        GPTQ(clip_grid=10, min_clip=0)


def test_gptq_with_an_identity_hessian_is_round_to_nearest_on_its_grid():
    # no error feedback without input correlation: every column rounds to nearest on GPTQ's grid
    # (min-max widened to include 0, integer zero point)
    w, _ = _layer(0)
    for scheme in (W4G32, WeightScheme(bits=4, granularity="per_channel", symmetric=True)):
        gptq = gptq_quantize(w, torch.eye(w.shape[1]), scheme, GPTQ(damp=0.01))
        group = 32 if scheme.granularity == "per_group" else w.shape[1]
        g = w.reshape(w.shape[0], -1, group)
        scale, zero = minmax_qparams(g, scheme, float_zero=False)
        expected = quantize_groups(g, scale, zero, scheme).reshape(w.shape)
        assert torch.equal(gptq.q.float(), expected) and torch.equal(gptq.scale, scale)


def test_asymmetric_rtn_maps_each_groups_range_exactly_onto_the_grid():
    w, _ = _layer(2)
    rtn = round_to_nearest(w, W4G32)
    g = w.reshape(w.shape[0], -1, 32)
    w_hat = rtn.dequantize().reshape(g.shape)
    torch.testing.assert_close(w_hat.amin(-1), g.amin(-1), rtol=1e-5, atol=1e-6)  # min -> 0, max -> 15
    torch.testing.assert_close(w_hat.amax(-1), g.amax(-1), rtol=1e-5, atol=1e-6)
    assert ((w_hat - g).abs() <= rtn.scale[..., None] / 2 + 1e-6).all()


def test_gptq_handles_dead_inputs_and_rejects_bad_hessians():
    w, x = _layer(1)
    x[:, 5] = 0  # an input channel that is always zero
    qw = gptq_quantize(w, x.t() @ x, W4G32)
    assert torch.isfinite(qw.dequantize()).all()
    with pytest.raises(ValueError, match="do not match"):
        gptq_quantize(w, torch.eye(7), W4G32)
    h = x.t() @ x
    h[0, 0] = float("nan")
    with pytest.raises(ValueError, match="inf/NaN"):
        gptq_quantize(w, h, W4G32)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), scheme=schemes)
def test_awq_beats_rtn_on_the_layer_output(seed, scheme):
    w, x = _layer(seed)
    result = awq_quantize(w, x.t() @ x, x.abs().mean(0), scheme, AWQ(grid=10, clip_grid=10))
    rtn = round_to_nearest(w, scheme)
    assert result.errors[result.alpha] <= result.errors[0.0]  # alpha = 0 is RTN
    assert _out_err(result.weight, w, x, result.input_scale) < _out_err(rtn, w, x)
    assert result.input_scale.shape == (w.shape[1],) and (result.input_scale > 0).all()


def test_awq_function_is_preserved_before_rounding():
    w, x = _layer(3)
    s = awq_quantize(w, x.t() @ x, x.abs().mean(0), W4G32).input_scale.double()
    torch.testing.assert_close((x.double() / s) @ (w.double() * s).t(), x.double() @ w.double().t())


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), bits=st.sampled_from([2, 3, 4]), group=st.sampled_from([32, 64, 128]))
def test_hqq_never_loses_to_rtn_on_its_objective_and_usually_wins(seed, bits, group):
    w, _ = _layer(seed, outliers=False)
    w = w + 0.3 * torch.randn(w.shape, generator=torch.Generator().manual_seed(seed)) ** 3  # heavy tails
    scheme = WeightScheme(bits=bits, granularity="per_group", group_size=group, symmetric=False)
    hqq, rtn = hqq_quantize(w, scheme, HQQ()), round_to_nearest(w, scheme)
    g = lambda t: t.reshape(w.shape[0], -1, group)  # noqa: E731
    e_hqq = lp_error(g(w), g(hqq.dequantize()), 0.7)
    e_rtn = lp_error(g(w), g(rtn.dequantize()), 0.7)
    assert (e_hqq <= e_rtn + 1e-5).all()
    assert e_hqq.sum() < e_rtn.sum()
    assert hqq.zero_point.dtype == torch.float32


def test_hqq_needs_asymmetric_weights():
    with pytest.raises(ValueError, match="asymmetric"):
        hqq_quantize(torch.randn(4, 32), WeightScheme(bits=4, granularity="per_group", group_size=32, symmetric=True))


@given(q=st.lists(st.lists(st.integers(0, 15), min_size=4, max_size=4), min_size=1, max_size=6).map(
    lambda rows: torch.tensor(rows)), reps=st.integers(1, 8))
def test_int4_packing_round_trips(q, reps):
    q = q.repeat(1, reps)
    packed = reference.pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (q.shape[0], q.shape[1] // 2)
    assert torch.equal(reference.unpack_int4(packed).long(), q)


# --- fp16 scales (the GGUF presets) ---------------------------------------------------------------------

from dataclasses import replace  # noqa: E402

from qcompiler.passes.weight_rounding.common import fp16_qparams, offset_is_fp16  # noqa: E402


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), magnitude=st.sampled_from([1e-6, 1e-4, 1e-2, 1.0, 100.0]),
       integral=st.booleans())
def test_fp16_qparams_put_scales_and_offsets_on_fp16(seed, magnitude, integral):
    gen = torch.Generator().manual_seed(seed)
    scale = torch.rand(4096, generator=gen) * magnitude + magnitude / 100
    zero = torch.randint(0, 16, (4096,), generator=gen).float()
    if not integral:
        zero = zero + torch.rand(4096, generator=gen)
    s, z = fp16_qparams(scale, zero, symmetric=False)
    assert torch.equal(s, s.half().float()) and (s > 0).all()
    assert offset_is_fp16(z, s).all()
    assert not offset_is_fp16(zero + 0.3, scale).all()  # the test can fail: arbitrary offsets are not fp16
    # the offset is the nearest fp16 value to the old one (or the next): a relative 2**-10 at most
    old, new = -zero * s, -z * s
    assert ((new - old).abs() <= old.abs() * 2**-10 + 2**-24).all()
    sym_s, sym_z = fp16_qparams(scale, None, symmetric=True)
    assert sym_z is None and torch.equal(sym_s, s)


@pytest.mark.parametrize("method", ["rtn", "gptq", "hqq"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_every_rounding_method_chooses_its_integers_for_fp16_scales(method, symmetric):
    if method == "hqq" and symmetric:
        pytest.skip("HQQ moves zero points: asymmetric only")
    scheme = replace(W4G32, symmetric=symmetric, fp16_scales=True)
    w, x = _layer(3)
    if method == "rtn":
        qw = round_to_nearest(w, scheme)
    elif method == "gptq":
        qw = gptq_quantize(w, x.t() @ x, scheme, GPTQ())
    else:
        qw = hqq_quantize(w, scheme, HQQ())
    assert torch.equal(qw.scale, qw.scale.half().float())
    if symmetric:
        assert qw.zero_point is None or not qw.zero_point.any()
    else:
        assert offset_is_fp16(qw.zero_point, qw.scale).all()
    # the integers are the ones round-to-nearest gives on those (fp16) parameters: none were chosen for
    # other scales (GPTQ moves later columns, so it is compared by its error instead)
    if method == "rtn":
        g = w.reshape(w.shape[0], -1, 32)
        q = quantize_groups(g, qw.scale, qw.zero_point, scheme)
        assert torch.equal(q.reshape(w.shape).to(qw.q.dtype), qw.q)
    fp32 = {"rtn": lambda: round_to_nearest(w, replace(scheme, fp16_scales=False)),
            "gptq": lambda: gptq_quantize(w, x.t() @ x, replace(scheme, fp16_scales=False), GPTQ()),
            "hqq": lambda: hqq_quantize(w, replace(scheme, fp16_scales=False), HQQ())}[method]()
    # fp16 parameters cost almost nothing: the output error within 2% of the float32-scale result
    assert _out_err(qw, w, x) <= 1.02 * _out_err(fp32, w, x)


def test_hqq_fits_the_asymmetric_layers_and_rounds_the_symmetric_ones_to_nearest():
    """A recipe mixing 4-bit asymmetric groups and int8 symmetric channels (what autotune writes) with HQQ:
    HQQ's zero points on the 4-bit layers, round to nearest on the int8 ones."""
    import qcompiler
    from qcompiler.config import HQQ, LayerOverride, Recipe, WeightScheme
    from tests.graphs import tiny_llama

    w4 = WeightScheme(bits=4, granularity="per_group", group_size=32, symmetric=False)
    recipe = Recipe(weight=w4, activation=None, rounding=HQQ(),
                    overrides=(LayerOverride("*.mlp.*", weight=WeightScheme(bits=8), weight_only=True),))
    torch._dynamo.reset()
    qcompiler.clear_reports()
    compiled = torch.compile(tiny_llama(), backend="qcompiler", options={"recipe": recipe, "kernels": "reference"})
    with torch.inference_mode():
        compiled(torch.tensor([[1, 2, 3, 4]]))
    decisions = qcompiler.last_report().quantized
    mlp = [d for d in decisions if ".mlp." in d.module]
    attn = [d for d in decisions if ".self_attn." in d.module]
    assert mlp and attn
    assert all("HQQ" not in d.reason and d.scheme.startswith("W: int8") for d in mlp)
    assert all("HQQ zero points" in d.reason and d.scheme.startswith("W: int4") for d in attn)
