"""gqa_attention: attention reads the key/value heads as they are instead of a repeated copy of them."""

from __future__ import annotations

import torch
import torch._C._nn as nn_c
from graphs import capture_graph, tiny_gpt2, tiny_llama

from qcompiler.passes.gqa_attention import gqa_attention


def _static_cache_call(model, cache_len=16, position=3):
    """A decode step: one token at ``position`` of a static cache (attention then takes a mask)."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=cache_len)
    ids = torch.randint(0, model.config.vocab_size, (1, 1))
    return (ids,), {"past_key_values": cache, "cache_position": torch.tensor([position]), "use_cache": True}


def _attention_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is nn_c.scaled_dot_product_attention]


def _generate_logits(model, rewrite: bool, steps: int = 4) -> tuple[list[torch.Tensor], list]:
    """Logits of a 5-token prompt and ``steps`` greedy decode steps on a static cache, the forward
    captured by Dynamo and run as captured (after gqa_attention when ``rewrite``)."""
    from transformers import StaticCache

    results = []

    def backend(gm, example_inputs):
        if rewrite:
            results.append(gqa_attention(gm))
            assert all(n.kwargs["enable_gqa"] for n in _attention_nodes(gm))
            for node in _attention_nodes(gm):  # key and value are the cache's own [B, KV, S, D] tensors
                assert all(a.meta["example_value"].shape[1] == model.config.num_key_value_heads for a in node.args[1:3])
        return gm.forward

    torch._dynamo.reset()
    forward = torch.compile(model.forward, backend=backend, dynamic=False)
    cache = StaticCache(config=model.config, max_cache_len=16)
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    logits = []
    with torch.no_grad():
        for step in range(steps + 1):
            start = 0 if step == 0 else 4 + step
            out = forward(input_ids=ids, past_key_values=cache, use_cache=True,
                          cache_position=torch.arange(start, start + ids.shape[1]))
            logits.append(out.logits[:, -1].clone())
            ids = out.logits[:, -1:].argmax(-1)
    return logits, results


def test_repeated_kv_heads_are_read_in_place_and_the_output_is_bit_identical():
    model = tiny_llama()  # 4 query heads, 2 key/value heads
    expected, _ = _generate_logits(model, rewrite=False)
    got, results = _generate_logits(model, rewrite=True)
    assert len(results) == 2  # the prompt's graph and the decode step's
    decode = results[-1]  # with a mask (the prompt's graph attends causally without one, already grouped)
    assert decode.modified and decode.counts == {"attention_without_kv_copy": 2}  # one per layer
    assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True))


def test_graphs_without_repeated_heads_are_left_alone():
    with torch.no_grad():
        gm, _ = capture_graph(tiny_gpt2(), torch.randint(0, 128, (1, 6)))  # as many key/value heads as queries
        code = gm.code
        result = gqa_attention(gm)
    assert not result.modified and result.counts == {"attention_without_kv_copy": 0} and gm.code == code


def test_the_backend_runs_grouped_query_attention_and_matches_the_reference_kernels():
    import qcompiler

    model = tiny_llama()
    args, kwargs = _static_cache_call(model)
    _, kwargs_ref = _static_cache_call(model)
    with torch.inference_mode():
        torch._dynamo.reset()
        fast = torch.compile(model, backend="qcompiler", options={"recipe": "w8a8-dynamic"})(*args, **kwargs)
        rep = qcompiler.last_report()
        torch._dynamo.reset()
        ref = torch.compile(model, backend="qcompiler",
                            options={"recipe": "w8a8-dynamic", "kernels": "reference"})(*args, **kwargs_ref)
    passes = {p.name: p for p in rep.passes}
    assert passes["gqa_attention"].counts == {"attention_without_kv_copy": 2}
    torch.testing.assert_close(fast.logits, ref.logits, rtol=1e-4, atol=1e-4)
