"""The outlier presets end to end on a tiny Llama: calibration (two passes), compile, kernels = reference."""

from dataclasses import replace

import pytest
import torch
from graphs import tiny_llama, token_batches

import qcompiler
from qcompiler.config import SmoothQuant
from qcompiler.core.errors import StatsError

PRESETS = ["w8a8-smoothquant", "w8a8-smoothquant-auto", "w8a8-ocs",
           pytest.param("llm-int8", marks=pytest.mark.inductor), "w8a8-dynamic-smoothquant",
           "w8a8-dynamic-smoothquant-auto", "w8a8-smoothquant-gptq", "w8a8-dynamic-smoothquant-gptq",
           "w8a8-rotated-ocs-llm-int8"]


@pytest.fixture(scope="module")
def model():
    m = tiny_llama()
    with torch.no_grad():
        # as in trained LLMs: an activation channel 30x the rest, read by weights that are small there
        for layer in m.model.layers:
            layer.input_layernorm.weight[5] = 30.0
            layer.post_attention_layernorm.weight[7] = 20.0
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.weight[:, 5] /= 30.0
            for proj in (layer.mlp.gate_proj, layer.mlp.up_proj):
                proj.weight[:, 7] /= 20.0
    return m


@pytest.mark.parametrize("preset", PRESETS)
def test_outlier_preset_compiles_whole_and_matches_its_reference(model, preset):
    torch._dynamo.reset()
    stats = qcompiler.calibrate(model, token_batches(), preset, progress=False)
    recipe = qcompiler.PRESETS[preset]
    # static ranges are observed after the transforms (a second pass); dynamic ones are not observed at all
    after = recipe.transform_fingerprint() if recipe.has_static_activations else repr(((), recipe.skip))
    assert stats.info["transforms"] == after
    ids = torch.randint(0, 128, (2, 10))
    with torch.inference_mode():
        float_logits = model(ids).logits
        qcompiler.clear_reports()
        torch._dynamo.reset()
        ref = torch.compile(model, backend="qcompiler", fullgraph=True,
                            options={"recipe": preset, "stats": stats, "kernels": "reference"})(ids).logits
        torch._dynamo.reset()
        fast = torch.compile(model, backend="qcompiler", fullgraph=True,
                             options={"recipe": preset, "stats": stats})(ids).logits
    rep = qcompiler.last_report()
    assert len(rep.quantized) == 14, [(d.module, d.reason) for d in rep.kept_float]
    assert {p.name: p.counts for p in rep.passes}["lower"] == {"lowered": 14, "not_lowered": 0}
    assert rep.transforms, "the transform pass reports what it did"
    # Layer by layer the kernels equal the QDQ graph up to float rounding (tests/lowering, test_backend);
    # through a whole model a last-bit difference can flip a later static rounding, so the two agree to
    # well within the quantization error, not bit for bit.
    quant_error = (ref - float_logits).abs().max()
    assert (fast - ref).abs().max() <= 0.25 * quant_error + 1e-5
    assert (fast - ref).abs().mean() <= 0.02 * quant_error
    assert torch.nn.functional.cosine_similarity(fast.flatten(), float_logits.flatten(), dim=0) > 0.95


def test_outlier_handling_beats_naive_static_on_an_outlier_model(model):
    ids = torch.cat(token_batches(), dim=0)
    # the injected outliers sit before the norm groups; a fixed alpha on this random MLP's up -> down
    # group is not expected to help (alpha="auto" may decline a group), so alpha 0.5 smooths norms only
    recipes = {
        "w8a8-static": "w8a8-static",
        "smoothquant-0.5-norms": replace(qcompiler.PRESETS["w8a8-smoothquant"], smoothquant=SmoothQuant(groups=("norm",))),
        "w8a8-smoothquant-auto": "w8a8-smoothquant-auto",
        "llm-int8": "llm-int8",
        "w8a8-rotated-ocs-llm-int8": "w8a8-rotated-ocs-llm-int8",
    }
    errors = {}
    for name, recipe in recipes.items():
        torch._dynamo.reset()
        stats = qcompiler.calibrate(model, token_batches(), recipe, progress=False)
        torch._dynamo.reset()
        with torch.inference_mode():
            out = torch.compile(model, backend="qcompiler", options={"recipe": recipe, "stats": stats})(ids).logits
            errors[name] = float((out - model(ids).logits).pow(2).mean())
    for name in ("smoothquant-0.5-norms", "w8a8-smoothquant-auto", "llm-int8", "w8a8-rotated-ocs-llm-int8"):
        assert errors[name] < errors["w8a8-static"] / 10, errors


def test_stats_gathered_without_the_transforms_are_rejected(model):
    torch._dynamo.reset()
    plain = qcompiler.calibrate(model, token_batches(), "w8a8-static", progress=False)
    with pytest.raises(Exception, match="not gathered with the same transforms"):
        with torch.inference_mode():
            torch._dynamo.reset()
            torch.compile(model, backend="qcompiler",
                          options={"recipe": "w8a8-smoothquant", "stats": plain})(torch.randint(0, 128, (1, 8)))
    assert issubclass(StatsError, qcompiler.core.errors.QCompilerError)


def test_smoothquant_survives_dynamic_shapes_in_calibration_and_compile(model):
    """A second sequence length makes Dynamo recompile with symbolic sizes; the attention probe
    (which runs the graph) must still run, in calibration and in the backend, with no float fallback."""
    torch._dynamo.reset()
    with torch.inference_mode():
        plain = torch.compile(model, backend="eager")
        for length in (8, 12):  # the frame is now marked dynamic for whatever compiles it next
            plain(torch.randint(0, 128, (1, length)))
    stats = qcompiler.calibrate(model, token_batches(), "w8a8-smoothquant", progress=False)
    qcompiler.clear_reports()
    with torch.inference_mode():
        compiled = torch.compile(model, backend="qcompiler", options={"recipe": "w8a8-smoothquant", "stats": stats})
        for length in (8, 13, 21):
            ids = torch.randint(0, 128, (1, length))
            out = compiled(ids).logits
            cosine = torch.nn.functional.cosine_similarity(out.flatten(), model(ids).logits.flatten(), dim=0)
            assert cosine > 0.95
    reports = qcompiler.reports()
    assert all(not r.error for r in reports), [r.error for r in reports]
    for r in reports:
        kinds = [d.split(":")[1].split()[0] for d in r.transforms["smoothquant"] if " group, " in d]
        assert kinds.count("attention") == 2, r.transforms["smoothquant"]  # o_proj of both layers, with a KV cache


def test_the_reports_kernels_line_counts_the_layers_a_split_left_quantized(model):
    recipe = qcompiler.Recipe(name="g16-ocs", weight=qcompiler.WeightScheme(bits=4, granularity="per_group",
                                                                            group_size=16, symmetric=False),
                              split_outliers=qcompiler.OutlierSplit(mode="weight", expand_ratio=0.25))
    torch._dynamo.reset()
    with torch.inference_mode():
        torch.compile(model, backend="qcompiler", fullgraph=True,
                      options={"recipe": recipe, "kernels": "reference"})(torch.randint(0, 128, (1, 8)))
    rep = qcompiler.last_report()
    # K 64 -> 80 stays quantized at group 16; the down projections' K 96 -> 120 does not
    assert len(rep.quantized) == 12 and sum(rep.plan.kernels.values()) == 12
    assert {d.reason for d in rep.kept_float if "down_proj" in d.module} == {
        "in_features 120 is not a multiple of group_size 16"}
    assert "kernels: reference quantize/dequantize ops (12 layers)" in str(rep)


@pytest.mark.parametrize("preset", ["w8a8-smoothquant-gptq", "w8a8-dynamic-smoothquant-gptq"])
def test_gptq_rounds_the_smoothed_weights_on_the_smoothed_inputs(model, preset):
    from qcompiler.core.ir import weight_checksum

    torch._dynamo.reset()
    stats = qcompiler.calibrate(model, token_batches(), preset, progress=False)
    assert len(stats.weights) == 14 and stats.raw is not None  # the float inputs SmoothQuant is computed from
    q = model.model.layers[0].self_attn.q_proj.weight
    entry = stats.weights["model.layers.0.self_attn.q_proj"]
    assert entry.method == "gptq" and entry.checksum != pytest.approx(weight_checksum(q))  # W * s, not W
    ids = torch.randint(0, 128, (2, 10))
    with torch.inference_mode():
        qcompiler.clear_reports()
        torch._dynamo.reset()
        torch.compile(model, backend="qcompiler", options={"recipe": preset, "stats": stats})(ids)
    rep = qcompiler.last_report()
    assert all(d.reason.startswith("GPTQ") for d in rep.quantized) and rep.transforms["smoothquant"]
    # statistics of the same recipe without GPTQ hold no rounded weights: refused, with what to do
    plain = qcompiler.calibrate(model, token_batches(), preset.replace("-gptq", "-auto" if "dynamic" in preset else ""),
                                progress=False)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="not calibrated with recipe"), torch.inference_mode():  # in Dynamo's error
        torch.compile(model, backend="qcompiler", options={"recipe": preset, "stats": plain})(ids)


def test_rounding_combines_with_smoothquant_only():
    from qcompiler import AWQ, GPTQ, HQQ, MixedInt8, Recipe

    base = qcompiler.PRESETS["w8a8-smoothquant"]
    assert replace(base, rounding=GPTQ()).rounding_fingerprint() != replace(
        base, smoothquant=SmoothQuant(alpha=0.6), rounding=GPTQ()).rounding_fingerprint()
    with pytest.raises(ValueError, match="SmoothQuant combines with GPTQ rounding only"):
        replace(base, rounding=AWQ())
    with pytest.raises(ValueError, match="SmoothQuant combines with GPTQ rounding only"):
        replace(base, weight=replace(base.weight, symmetric=False), rounding=HQQ())
    with pytest.raises(ValueError, match="outlier splitting or LLM.int8"):
        Recipe(mixed_int8=MixedInt8(), rounding=GPTQ())
