"""The outlier presets end to end on a tiny Llama: calibration (two passes), compile, kernels = reference."""

import pytest
import torch
from graphs import tiny_llama

import qcompiler
from qcompiler.errors import StatsError

PRESETS = ["w8a8-smoothquant", "w8a8-smoothquant-auto", "w8a8-ocs", "llm-int8"]


def _batches():
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, 128, (1, 16), generator=gen) for _ in range(3)]


@pytest.fixture(scope="module")
def model():
    m = tiny_llama()
    with torch.no_grad():  # give one channel a real outlier, as in trained LLMs
        for layer in m.model.layers:
            layer.input_layernorm.weight[5] = 30.0
            layer.post_attention_layernorm.weight[7] = 20.0
    return m


@pytest.mark.parametrize("preset", PRESETS)
def test_outlier_preset_compiles_whole_and_matches_its_reference(model, preset):
    torch._dynamo.reset()
    stats = qcompiler.calibrate(model, _batches(), preset, progress=False)
    assert stats.info["transforms"] == qcompiler.PRESETS[preset].transform_fingerprint()
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
    assert {p.name: p.counts for p in rep.passes}["lower"]["not_lowered"] == 0
    assert rep.transforms, "the transform pass reports what it did"
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)
    assert torch.nn.functional.cosine_similarity(fast.flatten(), float_logits.flatten(), dim=0) > 0.95


def test_outlier_handling_beats_naive_static_on_an_outlier_model(model):
    ids = torch.cat(_batches(), dim=0)
    errors = {}
    for preset in ["w8a8-static", "w8a8-smoothquant", "llm-int8"]:
        torch._dynamo.reset()
        stats = qcompiler.calibrate(model, _batches(), preset, progress=False)
        torch._dynamo.reset()
        with torch.inference_mode():
            out = torch.compile(model, backend="qcompiler", options={"recipe": preset, "stats": stats})(ids).logits
            errors[preset] = float((out - model(ids).logits).pow(2).mean())
    assert errors["w8a8-smoothquant"] < errors["w8a8-static"]
    assert errors["llm-int8"] < errors["w8a8-static"]


def test_stats_gathered_without_the_transforms_are_rejected(model):
    torch._dynamo.reset()
    plain = qcompiler.calibrate(model, _batches(), "w8a8-static", progress=False)
    with pytest.raises(Exception, match="not gathered with the same transforms"):
        with torch.inference_mode():
            torch._dynamo.reset()
            torch.compile(model, backend="qcompiler",
                          options={"recipe": "w8a8-smoothquant", "stats": plain})(torch.randint(0, 128, (1, 8)))
    assert issubclass(StatsError, qcompiler.errors.QCompilerError)
