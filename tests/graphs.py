"""Test helpers: tiny models built in the test, and graph capture as the backend sees it."""

from __future__ import annotations

import torch
import torch.fx as fx

from qcompiler.core import capture


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=128, n_positions=128, n_embd=64, n_layer=2, n_head=4)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=96, max_position_embeddings=128)
    return BertModel(cfg).eval()


def token_batches(count: int = 3, length: int = 16, vocab: int = 128, seed: int = 0) -> list[torch.Tensor]:
    """``count`` seeded batches of one row of ``length`` random token ids: calibration data for the tiny models."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (1, length), generator=gen) for _ in range(count)]


def capture_graph(model, *args, **kwargs) -> tuple[fx.GraphModule, list]:
    """The Dynamo graph and example inputs the backend would get (one graph, parameters bound)."""
    gm, calls = capture.capture(model, [capture.Batch(args, kwargs)], fullgraph=True, what="the test")
    return gm, calls[0]


def count_calls(gm: fx.GraphModule, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


def decode_step(model, recipe="w8a8-dynamic", kernels: str = "fast"):
    """``(logits, report)`` of one decode step on a static cache (a 5-token prompt, then one token at
    position 5), the forward compiled by the qcompiler backend with ``kernels``; the report is the decode
    step's graph's."""
    from transformers import StaticCache

    import qcompiler

    cache = StaticCache(config=model.config, max_cache_len=16)
    with torch.inference_mode():
        torch._dynamo.reset()
        forward = torch.compile(model, backend="qcompiler", options={"recipe": recipe, "kernels": kernels})
        forward(input_ids=torch.tensor([[3, 1, 4, 1, 5]]), past_key_values=cache, use_cache=True,
                cache_position=torch.arange(5))
        logits = forward(input_ids=torch.tensor([[9]]), past_key_values=cache, use_cache=True,
                         cache_position=torch.tensor([5])).logits
    return logits, qcompiler.last_report()
