"""4-bit (and 3-bit) weight-only recipes end to end on a tiny Llama: RTN, GPTQ, AWQ, HQQ."""

import copy

import pytest
import torch
from graphs import tiny_llama

import qcompiler
from qcompiler import AWQ, GPTQ, HQQ, Recipe, WeightScheme

W3 = WeightScheme(bits=3, granularity="per_group", group_size=32, symmetric=False)


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    qcompiler.clear_reports()


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama()
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 128, (1, 32), generator=gen) for _ in range(8)]
    ids = torch.randint(0, 128, (2, 32), generator=gen)
    with torch.inference_mode():
        ref = model(ids).logits
    return model, batches, ids, ref


def _recipe(rounding, weight=W3):
    return Recipe(name=type(rounding).__name__.lower() if rounding else "rtn", weight=weight, activation=None,
                  rounding=rounding)


def _logits(model, ids, recipe, stats=None, **options):
    torch._dynamo.reset()
    with torch.inference_mode():
        return torch.compile(model, backend="qcompiler",
                             options={"recipe": recipe, "stats": stats, **options})(ids).logits


def _mse(a, b):
    return float((a - b).pow(2).mean())


def test_gptq_and_awq_beat_rtn_on_the_model_and_round_trip_through_saved_stats(setup, tmp_path):
    model, batches, ids, ref = setup
    rtn_err = _mse(_logits(model, ids, _recipe(None)), ref)
    for rounding in (GPTQ(), AWQ()):
        recipe = _recipe(rounding)
        stats = qcompiler.calibrate(model, batches, recipe, progress=False)
        assert len(stats.weights) == 14 and stats.info["batches"] == 8
        out = _logits(model, ids, recipe, stats)
        rep = qcompiler.last_report()
        assert {p.name: p.counts for p in rep.passes}["lower"] == {"lowered": 14, "not_lowered": 0}
        assert all(d.reason.startswith(type(rounding).__name__) for d in rep.quantized)
        # a random tiny model on random tokens: GPTQ's error feedback gains a lot, AWQ's saliency little
        assert _mse(out, ref) < (0.8 if isinstance(rounding, GPTQ) else 1.0) * rtn_err
        folder = stats.save(tmp_path / type(rounding).__name__)
        assert torch.equal(_logits(model, ids, recipe, str(folder)), out)


def test_sequential_rounding_keeps_no_autograd_graph(setup, monkeypatch):
    # the model's parameters require grad; an activation that carried an autograd graph would keep
    # every earlier activation alive (the whole calibration set, layer after layer)
    from qcompiler.passes.weight_rounding import sequential

    model, batches, _, _ = setup
    assert all(p.requires_grad for p in model.parameters())
    tracked = []
    original = sequential._run_node

    def run_node(gm, node, env, j):
        out = original(gm, node, env, j)
        tracked.append(isinstance(out, torch.Tensor) and out.requires_grad)
        return out

    monkeypatch.setattr(sequential, "_run_node", run_node)
    qcompiler.calibrate(model, batches[:2], _recipe(GPTQ()), progress=False)
    assert tracked and not any(tracked)


def test_awq_layers_divide_their_input_by_the_searched_scale(setup):
    model, batches, ids, _ = setup
    recipe = _recipe(AWQ(grid=4, clip=False, foldable=False))
    stats = qcompiler.calibrate(model, batches, recipe, progress=False)
    q = stats.weights["model.layers.0.self_attn.q_proj"]
    assert q.input_scale.shape == (64,) and (q.input_scale > 0).all()
    ref_out = _logits(model, ids, recipe, stats)
    torch._dynamo.reset()
    with torch.inference_mode():
        qdq = torch.compile(model, backend="qcompiler",
                            options={"recipe": recipe, "stats": stats, "kernels": "reference"})(ids).logits
    assert (ref_out - qdq).abs().max() < 0.1 * (qdq.abs().max())


def _with_outlier_channels(model):
    """``model`` with a few large input channels in every linear's input (AWQ's salient channels)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[:4] *= 20
            layer.post_attention_layernorm.weight[:4] *= 20
            layer.self_attn.v_proj.weight[:4] *= 20  # o_proj's input channels 0-3 (value head 0)
            layer.mlp.up_proj.weight[:4] *= 20
    return model


def test_foldable_awq_shares_scales_and_folds_them_into_the_model(setup):
    model, batches, ids, _ = setup
    model = _with_outlier_channels(model)
    recipe = _recipe(AWQ(grid=10, clip_grid=4))
    stats = qcompiler.calibrate(model, batches, recipe, progress=False)
    layer = "model.layers.0."
    s = {name.removeprefix(layer): w.input_scale for name, w in stats.weights.items() if name.startswith(layer)}
    for a, b in (("self_attn.q_proj", "self_attn.k_proj"), ("self_attn.q_proj", "self_attn.v_proj"),
                 ("mlp.gate_proj", "mlp.up_proj")):  # one s per input: foldable into the norm
        assert s[a] is not None and torch.equal(s[a], s[b]), (a, b)
    for name in ("self_attn.o_proj", "mlp.down_proj"):  # powers of two: exact in the producer's row scales
        assert s[name] is not None and torch.equal(torch.exp2(torch.log2(s[name]).round()), s[name]), name
    # o_proj reads 4 query heads of 16 channels; heads 2h and 2h+1 read value head h: tied
    heads = s["self_attn.o_proj"].reshape(2, 2, 16)
    assert torch.equal(heads[:, 0], heads[:, 1]) and heads[0, 0, :4].min() > heads[0, 0, 4:].max()
    assert any(n.startswith("alpha") and "norm group" in n for n in (w.note for w in stats.weights.values()))

    # the compiled model is the float model with each weight replaced by its rounded one (W * s quantized,
    # divided by s): folding 1/s into the norms and the up projections' rows changed only float rounding
    out = _logits(model, ids, recipe, stats, kernels="reference")
    counts = {p.name: p.counts for p in qcompiler.last_report().passes}
    assert counts["fold_awq"] == {"folded": 6, "marked": 2}, counts  # 2 layers x (2 norms, down; o_proj)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, rounded in stats.weights.items():
            reference.get_submodule(name).weight.copy_(rounded.dequantized(torch.float32))
        expected = reference(ids).logits
    assert torch.allclose(out, expected, atol=1e-4, rtol=1e-4), (out - expected).abs().max()

    # the fold preserves the float function, and each folded layer's float weight is the one it computes
    # with (W * s after the norm's 1/s): with every layer put back to float, the graph is the float model
    from qcompiler.core import capture
    from qcompiler.tools import compare

    result = qcompiler.compare(model, recipe, ids, stats=stats, top=0)
    assert next(p for p in result.passes if p.name == "fold_awq").sqnr_db > 100
    gm0, calls = capture.capture(model, [capture.as_batch(ids)], what="test")
    steps = qcompiler.pipeline.build(recipe, torch.device("cpu"), stats=stats, kernels="reference")
    gm = compare._qdq_graph(gm0, calls[0], steps)
    for name in stats.weights:
        compare._keep_in_float(gm, name)
    with torch.inference_mode():
        back = compare.main_output(gm(*calls[0]))
        assert torch.allclose(back, model(ids).logits, atol=1e-4, rtol=1e-4)


def test_hqq_needs_no_calibration_and_beats_rtn_on_weight_error(setup):
    model, _, ids, ref = setup
    out = _logits(model, ids, _recipe(HQQ()))
    rep = qcompiler.last_report()
    assert all(d.reason.startswith("HQQ") for d in rep.quantized)
    assert torch.isfinite(out).all() and _mse(out, ref) < 10 * _mse(_logits(model, ids, _recipe(None)), ref)


def test_rounding_recipes_check_their_statistics(setup):
    model, batches, ids, _ = setup
    gptq = _recipe(GPTQ())
    with pytest.raises(Exception, match="rounds weights on calibration data"):
        _logits(model, ids, gptq)
    awq_stats = qcompiler.calibrate(model, batches, _recipe(AWQ(grid=2, clip=False)), progress=False)
    with pytest.raises(Exception, match="not calibrated with recipe 'gptq'"):
        _logits(model, ids, gptq, awq_stats)
    stats = qcompiler.calibrate(model, batches, gptq, progress=False)
    other = tiny_llama(seed=1)  # same shapes, other weights
    with pytest.raises(Exception, match="gathered on other weights"):  # their fingerprints
        _logits(other, ids, gptq, stats)
    with pytest.raises(Exception, match="changed since it was rounded"):  # allowed on purpose: GPTQ's own check
        _logits(other, ids, gptq, stats, other_weights=True)


def test_recipe_validation_for_rounding():
    with pytest.raises(TypeError, match="GPTQ"):
        Recipe(rounding="gptq")
    with pytest.raises(ValueError, match="asymmetric"):
        Recipe(weight=WeightScheme(bits=4, granularity="per_group", group_size=32, symmetric=True), rounding=HQQ())
    with pytest.raises(ValueError, match="damp"):
        GPTQ(damp=0)
    for name in ("w4a16-rtn", "w4a16-gptq", "w4a16-awq", "w4a16-hqq"):
        preset = qcompiler.PRESETS[name]
        assert preset.weight.bits == 4 and preset.weight.group_size == 128 and preset.activation is None
    assert qcompiler.PRESETS["w4a16-gptq"].needs_calibration and not qcompiler.PRESETS["w4a16-hqq"].needs_calibration


def test_fit_group_takes_the_largest_power_of_two_that_divides_the_width():
    scheme = WeightScheme(bits=4, granularity="per_group", group_size=128, symmetric=False, fit_group=True)
    assert scheme.fitted(1536) is scheme
    assert scheme.fitted(576).group_size == 64  # SmolLM2's hidden width
    assert scheme.fitted(96).group_size == 32
    assert scheme.fitted(100) is scheme  # nothing fits: the layer stays in float, with the reason
    assert WeightScheme(bits=4, granularity="per_group", group_size=128).fitted(576).group_size == 128
    with pytest.raises(ValueError, match="fit_group"):
        WeightScheme(bits=4, fit_group=True)


@pytest.mark.parametrize("preset", ["w4a16-rtn", "w4a16-gptq"])
def test_presets_fit_the_group_to_layers_128_does_not_divide(setup, preset):
    # tiny_llama's widths are 64 and 96: at group 128 every layer would stay in float
    model, batches, ids, ref = setup
    recipe = qcompiler.PRESETS[preset]
    stats = qcompiler.calibrate(model, batches, recipe, progress=False) if recipe.needs_calibration else None
    out = _logits(model, ids, recipe, stats)
    rep = qcompiler.last_report()
    assert len(rep.quantized) == 14 and [d.module for d in rep.kept_float] == ["lm_head"]
    groups = {d.module.rsplit(".", 1)[-1]: d.scheme for d in rep.quantized}
    assert "g64" in groups["q_proj"] and "g32" in groups["down_proj"]
    assert all("not a multiple of 128" in d.reason for d in rep.quantized)
    # stored per group of 64 and 32: a float32 scale and a float32 zero point (RTN) or an integer one at 4 bits
    # (GPTQ); in memory ATen's bf16 pair
    per_group = 64 if preset == "w4a16-rtn" else 36
    assert {d.bits_per_weight for d in rep.quantized} == {4 + per_group / 64, 4 + per_group / 32}
    assert _mse(out, ref) < 0.1 * float(ref.pow(2).mean())


@pytest.mark.parametrize("preset", ["w8a16-q8_0", "w4a16-q4_0-gptq", "w4a16-q4_1-hqq"])
def test_gguf_presets_run_in_process_with_the_fast_kernels_as_with_the_reference(setup, preset):
    """fp16 scales, groups of 32 and (Q4_0) the full [-8, 7] range: the int4 kernel takes the -8 level."""
    model, batches, ids, ref = setup
    recipe = qcompiler.PRESETS[preset]
    stats = qcompiler.calibrate(model, batches, recipe, progress=False) if recipe.needs_calibration else None
    fast = _logits(model, ids, recipe, stats)
    reference = _logits(model, ids, recipe, stats, kernels="reference")
    assert torch.allclose(fast, reference, atol=2e-2, rtol=1e-2), (fast - reference).abs().max()
    assert _mse(reference, ref) < 0.05 * float(ref.pow(2).mean())
    if preset == "w4a16-q4_0-gptq":
        from qcompiler.passes.weight_rounding import round_to_nearest

        w = model.model.layers[0].mlp.up_proj.weight.detach()
        assert int(round_to_nearest(w, recipe.weight).q.min()) == -8  # the 16th level is used
