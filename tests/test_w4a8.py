"""W4A8 (``w4a8-dynamic-rotated-gptq``): the rotation, GPTQ 4-bit weights per output channel, per-token int8
activations, on the int8 kernels (prefill GEMM, decode GEMV)."""

import pytest
import torch
from graphs import tiny_llama, token_batches

import qcompiler
from qcompiler.lowering.kernels import cpu
from qcompiler.tools import models

PRESET = "w4a8-dynamic-rotated-gptq"


@pytest.fixture(scope="module")
def llama():
    model = tiny_llama()
    return model, qcompiler.calibrate(model, token_batches(), PRESET, progress=False)


@pytest.mark.inductor
def test_w4a8_runs_whole_on_the_int8_kernels_and_matches_its_reference(llama):
    model, stats = llama
    ids = torch.randint(0, 128, (2, 10))
    logits = {}
    with torch.inference_mode():
        float_logits = model(ids).logits
        for kernels in ("reference", "fast"):
            torch._dynamo.reset()
            qcompiler.clear_reports()
            logits[kernels] = torch.compile(model, backend="qcompiler", fullgraph=True,
                                            options={"recipe": PRESET, "stats": stats, "kernels": kernels})(ids).logits
    rep = qcompiler.last_report()
    assert {p.name: p.counts for p in rep.passes}["lower"] == {"lowered": 14, "not_lowered": 0}
    assert rep.transforms["rotate"]
    assert all(layer.kernel.startswith(("FBGEMM", "oneDNN")) for layer in rep.plan.quantized), rep.plan
    for d in rep.quantized:
        assert d.reason.startswith("GPTQ") and "int4 per_channel sym-full" in d.scheme and "int8 dynamic" in d.scheme
        n, k = model.get_submodule(d.module).weight.shape
        assert d.bits_per_weight == pytest.approx(4 + 32 / k)  # 4-bit integers and a float32 scale per channel
        assert d.kernel_bytes == n * k + 4 * n  # the kernels hold each integer in a byte
    # the integer products are exact on both paths: only the float epilogue's order differs
    torch.testing.assert_close(logits["fast"], logits["reference"], rtol=1e-5, atol=1e-5)
    cos = torch.nn.functional.cosine_similarity(logits["fast"].flatten(), float_logits.flatten(), dim=0)
    assert cos > 0.95


def test_the_weights_are_4_bit_integers_on_all_16_levels(llama):
    model, stats = llama
    weight = stats.weights["model.layers.0.mlp.down_proj"].weight
    q = weight.q
    assert weight.bits == 4 and weight.symmetric and weight.zero_point is None
    assert int(q.min()) >= -8 and int(q.max()) <= 7
    assert int(q.min()) == -8  # full range: the largest magnitude of a channel lands on -8
    assert weight.scale.numel() == q.shape[0]  # one scale per output channel


def test_4_bit_weights_never_reach_the_int16_pair_limit_of_cpus_without_vnni():
    # every pair of 4-bit values, against the largest uint8 activation: |a| + |b| <= 16, far below the limit
    levels = torch.arange(-8, 8, dtype=torch.int8)
    pairs = torch.cartesian_prod(levels, levels).reshape(16, 32)
    limited, changed = cpu.limit_pair_sums(pairs, cpu.PAIR_LIMIT)
    assert changed == 0 and torch.equal(limited, pairs)
    kept, excess = cpu._split_excess(pairs)
    assert excess is None and torch.equal(kept, pairs)


def test_w4a8_generates_the_reference_kernels_greedy_tokens():
    from qcompiler.calibration.calibrate import text_batches

    stories = models.load_model("stories260k")
    batches = text_batches(stories.tokenizer, models.default_calibration_text(), 4, 32, add_bos=stories.add_bos)
    stats = qcompiler.calibrate(stories.model, batches, PRESET, progress=False)
    text = stories.tokenizer("Once upon a time, there was a little", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([[stories.tokenizer.bos_token_id] + text])
    tokens = {}
    for kernels in ("reference", "fast"):
        torch._dynamo.reset()
        quantized = qcompiler.compile(stories.model, PRESET, stats=stats, kernels=kernels, max_cache_len=48,
                                      compiler="eager")
        with torch.inference_mode(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as p:
            tokens[kernels] = quantized.generate(ids, max_new_tokens=16, do_sample=False)
        ops = {event.key for event in p.key_averages()}
        if kernels == "fast":  # the prompt on the int8 GEMM, the decode steps on the int8 GEMV
            assert {"qcompiler::int8_gemm", "qcompiler::int8_gemv"} <= ops, sorted(ops)
    assert torch.equal(tokens["reference"], tokens["fast"])


def test_the_artifact_stores_4_bits_per_weight_and_loads_bit_identical(tmp_path, llama):
    from safetensors.torch import load_file

    from qcompiler.tools import quantize

    model, stats = llama
    recipe = qcompiler.PRESETS[PRESET]
    ids = torch.randint(0, 128, (2, 24))
    torch._dynamo.reset()
    folder = quantize.quantize(model, recipe, ids[:1], tmp_path / "art", stats)
    tensors = load_file(str(folder / "weights.safetensors"))
    packed = [t for name, t in tensors.items() if name.endswith("_w_q")]
    linear_weights = sum(p.numel() for name, p in model.named_parameters() if "proj" in name)
    assert len(packed) == 14 and sum(t.numel() for t in packed) == linear_weights // 2  # two 4-bit values a byte
    with torch.inference_mode():
        torch._dynamo.reset()
        direct = torch.compile(model, backend="qcompiler", options={"recipe": recipe, "stats": stats})(ids).logits
        torch._dynamo.reset()
        loaded = qcompiler.load(folder, model)(ids).logits
    assert torch.equal(direct, loaded)


def test_export_refuses_w4a8_before_any_work_and_says_why():
    from qcompiler.core.errors import ExportError
    from qcompiler.tools.export.build import refuse_transforms

    with pytest.raises(ExportError, match="rotation"):
        refuse_transforms(qcompiler.PRESETS[PRESET])
