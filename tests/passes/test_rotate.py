"""The residual-stream rotation: Hadamard matrices, the function preserved in float64 (with and without a KV
cache), the stream found from the graph (or a clear refusal), and less W8A8 error on an outlier model."""

from dataclasses import replace

import pytest
import torch
from graphs import tiny_bert, tiny_gpt2, tiny_llama, token_batches

import qcompiler
from qcompiler import Recipe, Rotation
from qcompiler.core import capture, hadamard
from qcompiler.passes.rotate import RotationError, find_stream


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    qcompiler.clear_reports()


@pytest.mark.parametrize("n", [2, 12, 20, 24, 64, 144, 240, 384, 400, 576, 1536])
def test_hadamard_matrices(n):
    h = hadamard.hadamard(n)
    assert h is not None and set(h.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(h @ h.t(), n * torch.eye(n, dtype=torch.float64))
    q, how = hadamard.orthogonal(n, seed=3)
    assert "Hadamard" in how and torch.allclose(q @ q.t(), torch.eye(n, dtype=torch.float64), atol=1e-12)
    a, b = hadamard.kron_parts(n)
    x = torch.randn(3, 2, n, dtype=torch.float64)
    assert torch.allclose(hadamard.apply_kron(x, a, b), x @ (h / n**0.5), atol=1e-12)


def test_widths_without_a_hadamard_matrix_get_a_random_orthogonal_one():
    assert hadamard.hadamard(100) is None and hadamard.factors(2880) is None
    q, how = hadamard.orthogonal(100, seed=1)
    assert how.startswith("random orthogonal") and torch.allclose(q @ q.t(), torch.eye(100, dtype=torch.float64),
                                                                 atol=1e-12)
    assert torch.equal(q, hadamard.orthogonal(100, seed=1)[0]) and not torch.equal(q, hadamard.orthogonal(100, 2)[0])


def _rotated_only(**kw):
    # nothing quantized: the graph is the float model, rotated
    return Recipe(name="rotated-float", activation=None, skip=("*",), rotation=Rotation(**kw))


def _gpt2_with_affine_norms():
    model = tiny_gpt2()
    with torch.no_grad():  # fresh LayerNorms are the identity: give them weights and biases to fold
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return model


@pytest.mark.parametrize("arch, online", [("llama", True), ("llama", False), ("gpt2", True)])
def test_rotation_preserves_the_function_in_float64_with_and_without_a_kv_cache(arch, online):
    model = (tiny_llama() if arch == "llama" else _gpt2_with_affine_norms()).double()
    ids = torch.randint(0, 128, (2, 12))
    compiled = torch.compile(model, backend="qcompiler",
                             options={"recipe": _rotated_only(online=online)})
    # Hugging Face's RMS norm computes in float32 even in a float64 model: float32 rounding is the bound there
    tol = dict(atol=1e-6, rtol=1e-6) if arch == "llama" else dict(atol=1e-10, rtol=1e-10)
    with torch.inference_mode():
        ref = model(ids, use_cache=False).logits
        out = compiled(ids, use_cache=False).logits
        assert torch.allclose(out, ref, **tol), (out - ref).abs().max()
        counts = {p.name: p.counts for p in qcompiler.last_report().passes}["rotate"]
        # prefill then one decode step, the cache written and read by the rotated graphs
        first = compiled(ids[:, :-1], use_cache=True)
        step = compiled(ids[:, -1:], past_key_values=first.past_key_values, use_cache=True).logits
        assert torch.allclose(step[:, -1], ref[:, -1], **tol)
    readers = 11 if arch == "llama" else 5  # GPT-2: one c_attn for q/k/v, one c_fc
    assert counts == {"norms": 5, "readers": readers, "writers": 4, "online": 2 if online else 0}
    if arch == "gpt2":
        assert "LayerNorms (stream centered" in qcompiler.last_report().transforms["rotate"][0]


def test_the_stream_is_found_from_the_graph_and_other_models_are_refused():
    model = tiny_llama()
    gm, calls = capture.capture(model, [capture.as_batch(torch.randint(0, 128, (1, 8)))], what="test")
    capture.bind_parameters(gm, calls[0])
    steps = qcompiler.pipeline.base_steps(Recipe(activation=None))
    gm = qcompiler.pipeline.run(gm, steps, qcompiler.report.CompileReport(0, "", ""))
    stream = find_stream(gm)
    assert stream.width == 64 and len(stream.norms) == 5 and len(stream.writers) == 4
    readers = sorted(r.meta["qcompiler.linear"].module for n in stream.norms for r in n.readers)
    assert readers[0] == "lm_head" and sum("q_proj" in r for r in readers) == 2

    gpt2 = tiny_gpt2()  # LayerNorms, a position embedding added to the token one, inactive dropouts
    gm, calls = capture.capture(gpt2, [capture.as_batch(torch.randint(0, 128, (1, 8)))], what="test")
    capture.bind_parameters(gm, calls[0])
    gm = qcompiler.pipeline.run(gm, steps, qcompiler.report.CompileReport(0, "", ""))
    stream = find_stream(gm)
    assert len(stream.embeddings) == 2 and {n.kind for n in stream.norms} == {"layer"}

    bert = tiny_bert()  # post-norm: a LayerNorm's output is both the stream and the next layer's input
    gm, calls = capture.capture(bert, [capture.as_batch(torch.randint(0, 128, (1, 8)))], what="test")
    capture.bind_parameters(gm, calls[0])
    gm = qcompiler.pipeline.run(gm, steps, qcompiler.report.CompileReport(0, "", ""))
    with pytest.raises(RotationError, match="also used by|start at a token embedding|feeds"):
        find_stream(gm)


def test_rotation_lowers_w8a8_error_on_an_outlier_model():
    model = tiny_llama()
    with torch.no_grad():  # a residual channel 50x the rest, as in trained LLMs
        model.model.embed_tokens.weight[:, 3] *= 50
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[3] *= 50
    ids = torch.randint(0, 128, (2, 16))
    base = qcompiler.PRESETS["w8a8-dynamic"]
    errors = {}
    with torch.inference_mode():
        ref = model(ids).logits
        for name, recipe in (("plain", base), ("rotated", replace(base, name="rotated", rotation=Rotation()))):
            torch._dynamo.reset()
            out = torch.compile(model, backend="qcompiler", options={"recipe": recipe})(ids).logits
            errors[name] = float((out - ref).pow(2).mean())
    assert errors["rotated"] < 0.5 * errors["plain"], errors


@pytest.mark.parametrize("preset", ["w8a8-smoothquant", "w4a16-gptq", "w4a16-awq"])
def test_rotation_composes_with_calibrated_recipes(preset):
    """Statistics, SmoothQuant's migration and GPTQ/AWQ rounding are all computed on the rotated model."""
    model = tiny_llama()
    batches = token_batches()
    recipe = replace(qcompiler.PRESETS[preset], name=f"{preset}-rotated", rotation=Rotation(seed=1))
    stats = qcompiler.calibrate(model, batches, recipe, progress=False)
    assert stats.info["rotation"] == repr(Rotation(seed=1))
    ids = torch.randint(0, 128, (2, 10))
    with torch.inference_mode():
        ref = model(ids).logits
        torch._dynamo.reset()
        out = torch.compile(model, backend="qcompiler", options={"recipe": recipe, "stats": stats})(ids).logits
    rep = qcompiler.last_report()
    assert "rotate" in rep.transforms and len(rep.quantized) == 14
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.95
    # statistics of the unrotated recipe describe another model: refused, with what to do
    plain = qcompiler.calibrate(model, batches, preset, progress=False)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="gathered with rotation None"), torch.inference_mode():
        torch.compile(model, backend="qcompiler", options={"recipe": recipe, "stats": plain})(ids)


def test_rotated_recipes_round_trip_as_json_and_are_not_exported():
    from qcompiler.config import recipe_from_json, recipe_to_json
    from qcompiler.core.errors import ExportError
    from qcompiler.tools.export.build import refuse_transforms

    recipe = qcompiler.PRESETS["w8a8-dynamic-rotated"]
    assert recipe_from_json(recipe_to_json(recipe)) == recipe and not recipe.needs_calibration
    with pytest.raises(ExportError, match="rotation"):
        refuse_transforms(recipe)
    with pytest.raises(ValueError, match="Rotation.seed"):
        Rotation(seed=-1)


def test_compare_and_explain_show_the_rotation_pass():
    """compare runs the passes one by one on parameters that require grad (no inference mode)."""
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 16))
    result = qcompiler.compare(model, "w8a8-dynamic-rotated", ids, top=2)
    rotate = next(p for p in result.passes if p.name == "rotate")
    assert rotate.sqnr_db > 60 and rotate.top1_agreement == 1.0  # float32 rounding only
    assert len(result.attribution) == 2
