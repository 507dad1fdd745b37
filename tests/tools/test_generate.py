"""qcompiler.compile(model, ...).generate(): Hugging Face's generation loop on the quantized graphs."""

import pytest
import torch

import qcompiler
from qcompiler.core.errors import ConfigError, QCompilerError
from qcompiler.tools import models


@pytest.fixture(scope="module")
def stories():
    return models.load_model("stories260k")


def _prompt(loaded, text="Once upon a time, there was a little"):
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor([([loaded.tokenizer.bos_token_id] if loaded.add_bos else []) + ids])


def _ops_run(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {event.key for event in prof.key_averages()}


@pytest.mark.inductor
def test_generate_runs_the_quantized_kernels_and_compiles_two_graphs(stories):
    torch._dynamo.reset()
    qcompiler.clear_reports()
    quantized = qcompiler.compile(stories.model, "w8a8-dynamic", max_cache_len=160)
    ids = _prompt(stories)
    with torch.inference_mode():
        ops = _ops_run(lambda: quantized.generate(ids, max_new_tokens=100, do_sample=False))
        out = quantized.generate(ids, max_new_tokens=100, do_sample=False)
        float_out = stories.model.generate(ids, max_new_tokens=100, do_sample=False)
    # prefill: the int8 GEMM; decode steps: the C++ GEMV kernels (int8 activations, int8 LM head)
    assert {"qcompiler::int8_gemm", "qcompiler::int8_gemv", "qcompiler::int8_weight_gemv"} <= ops, sorted(ops)
    assert out.shape == (1, ids.shape[1] + 100)
    assert len(qcompiler.reports()) == 2  # one graph for the prompt, one for every decode step
    # of each generate's 99 decode steps, two went through Dynamo and 97 called the graph directly
    assert quantized.forward.replayed == 2 * 97
    # and of those, 97 had their inputs built by qcompiler's decode loop, two by Hugging Face (decode_loop.py)
    assert quantized.decode_loop.fast_steps == 2 * 97 and quantized.decode_loop.fallback is None
    # every linear layer, and the LM head the recipe keeps float gets int8 weights (lm_head="int8")
    assert all(len(report.quantized) == 36 for report in qcompiler.reports())
    # quantized, and not the float model under another name
    assert not torch.equal(out, float_out)
    agreement = (out[0, ids.shape[1]:] == float_out[0, ids.shape[1]:]).float().mean()
    assert agreement > 0.1
    assert stories.model.forward.__func__ is type(stories.model).forward  # the user's model is untouched


def test_eager_compiler_generates_on_the_same_kernels_without_inductor(stories, monkeypatch):
    import torch._inductor.compile_fx as inductor

    def no_inductor(*args, **kwargs):
        raise AssertionError("Inductor compiled a graph of compiler='eager'")

    monkeypatch.setattr(inductor, "compile_fx", no_inductor)
    torch._dynamo.reset()
    qcompiler.clear_reports()
    quantized = qcompiler.compile(stories.model, "w8a8-dynamic", max_cache_len=48, compiler="eager")
    ids = _prompt(stories)
    with torch.inference_mode():
        ops = _ops_run(lambda: quantized.generate(ids, max_new_tokens=16, do_sample=False))
    assert {"qcompiler::int8_gemm", "qcompiler::int8_gemv", "qcompiler::int8_weight_gemv"} <= ops, sorted(ops)
    assert len(qcompiler.reports()) == 2
    with pytest.raises(ConfigError, match="compiler"):
        qcompiler.compile(stories.model, "w8a8-dynamic", compiler="tvm")


def test_replayed_decode_steps_give_the_tokens_of_steps_through_dynamo(stories, monkeypatch):
    from qcompiler.tools import replay

    ids = _prompt(stories)
    tokens = {}
    for mode in ("replay", "dynamo"):
        if mode == "dynamo":
            monkeypatch.setattr(replay.Recorder, "record", lambda self, call, kwargs: (call(**kwargs), None))
        torch._dynamo.reset()
        quantized = qcompiler.compile(stories.model, "w8a8-dynamic", max_cache_len=128, compiler="eager")
        with torch.inference_mode():
            tokens[mode] = quantized.generate(ids, max_new_tokens=100, do_sample=False)
        assert quantized.forward.replayed == (97 if mode == "replay" else 0)
    assert torch.equal(tokens["replay"], tokens["dynamo"])
    # replayed steps skip the check that the weights are unchanged; the next generate() still makes it
    weight = stories.model.lm_head.weight
    with torch.no_grad():
        weight.mul_(1.0)
    with torch.inference_mode(), pytest.raises(QCompilerError, match="weight was changed in place"):
        quantized.generate(ids, max_new_tokens=4, do_sample=False)


def test_lm_head_recipe_leaves_the_recipe_as_it_is(stories):
    torch._dynamo.reset()
    qcompiler.clear_reports()
    quantized = qcompiler.compile(stories.model, "w8a8-dynamic", max_cache_len=32, lm_head="recipe")
    with torch.inference_mode():
        quantized.generate(_prompt(stories), max_new_tokens=2, do_sample=False)
    assert all(len(report.quantized) == 35 for report in qcompiler.reports())
    with pytest.raises(ConfigError, match="lm_head must be"):
        qcompiler.compile(stories.model, "w8a8-dynamic", lm_head="int4")


def test_a_calibrated_gptq_recipe_generates_with_its_statistics(stories):
    # GPTQ's statistics are keyed to the recipe's skip list: its LM head stays as the recipe has it (float)
    # rather than being switched to int8, which would make the statistics another recipe's
    from qcompiler.calibration.calibrate import text_batches

    batches = text_batches(stories.tokenizer, models.default_calibration_text(), 4, 32, add_bos=stories.add_bos)
    stats = qcompiler.calibrate(stories.model, batches, "w4a16-gptq")
    torch._dynamo.reset()
    qcompiler.clear_reports()
    quantized = qcompiler.compile(stories.model, "w4a16-gptq", stats=stats, max_cache_len=32)
    with torch.inference_mode():
        out = quantized.generate(_prompt(stories), max_new_tokens=4, do_sample=False)
    assert out.shape[1] == _prompt(stories).shape[1] + 4
    decisions = {d.module: d for d in qcompiler.last_report().layers}
    assert not decisions["lm_head"].quantized and decisions["model.layers.0.self_attn.q_proj"].quantized


@pytest.mark.inductor
def test_greedy_tokens_of_the_fast_kernels_are_the_reference_kernels_tokens(stories):
    ids = _prompt(stories)
    tokens = {}
    for kernels in ("reference", "fast"):
        torch._dynamo.reset()
        quantized = qcompiler.compile(stories.model, "w8a8-dynamic", kernels=kernels, max_cache_len=64)
        with torch.inference_mode():
            tokens[kernels] = quantized.generate(ids, max_new_tokens=32, do_sample=False)
    assert torch.equal(tokens["reference"], tokens["fast"])


def test_prompts_of_other_lengths_and_padded_batches_reuse_the_graphs(stories):
    torch._dynamo.reset()
    qcompiler.clear_reports()
    quantized = qcompiler.compile(stories.model, "w8a8-dynamic", max_cache_len=64)
    tok = stories.tokenizer
    with torch.inference_mode():
        for text in ("Once upon a time", "The cat sat on the mat and looked at the big red ball"):
            quantized.generate(_prompt(stories, text), max_new_tokens=8, do_sample=False)
        assert len(qcompiler.reports()) == 2
        # a batch of two with left padding gives each row the tokens it gets alone
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token or tok.unk_token
        texts = ["Once upon a time", "The little dog ran to the park"]
        batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        together = quantized.generate(**batch, max_new_tokens=6, do_sample=False)
        for row, text in enumerate(texts):
            alone = quantized.generate(tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"],
                                       max_new_tokens=6, do_sample=False)
            assert torch.equal(together[row, -6:], alone[0, -6:])
        # sampling options are Hugging Face's
        sampled = quantized.generate(_prompt(stories), max_new_tokens=5, do_sample=True, temperature=0.8, top_k=20)
        assert sampled.shape[1] == _prompt(stories).shape[1] + 5


def test_bad_generation_inputs_are_errors_before_anything_runs(stories):
    quantized = qcompiler.compile(stories.model, "w8a8-dynamic", max_cache_len=32)
    ids = _prompt(stories)
    with pytest.raises(ConfigError, match="prompt is empty"):
        quantized.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=4)
    with pytest.raises(ConfigError, match="max_new_tokens must be a positive int"):
        quantized.generate(ids, max_new_tokens=0)
    with pytest.raises(ConfigError, match="KV cache holds 32"):
        quantized.generate(ids, max_new_tokens=40)
    with pytest.raises(ConfigError, match=r"\[batch, length\] tensor"):
        quantized.generate(ids[0], max_new_tokens=4)
    with pytest.raises(ConfigError, match="more than the model's context"):
        qcompiler.compile(stories.model, "w8a8-dynamic", max_cache_len=10**6)
    with pytest.raises(ConfigError, match="max_cache_len must be an int"):
        qcompiler.compile(stories.model, "w8a8-dynamic", max_cache_len=1)
    with pytest.raises(ConfigError, match="unknown recipe"):
        qcompiler.compile(stories.model, "w3a3-magic")


def test_a_model_without_a_generation_head_says_so():
    from transformers import BertConfig, BertModel

    encoder = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                   vocab_size=100)).eval()
    quantized = qcompiler.compile(encoder, "w8a8-dynamic")
    with pytest.raises(ConfigError, match="no generation head"):
        quantized.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2)
    with torch.inference_mode():  # the forward itself is quantized and works
        out = quantized(input_ids=torch.tensor([[1, 2, 3]])).last_hidden_state
    assert out.shape == (1, 3, 32)
