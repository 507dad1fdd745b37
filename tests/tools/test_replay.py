"""Decode steps that call the compiled graph without Dynamo's frame entry (qcompiler/tools/replay.py)."""

import gc

import pytest
import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from qcompiler.tools.generate import CompiledForward


class Cache:
    """A KV-cache stand-in: tensors the forward updates in place, as Hugging Face's StaticCache does."""

    def __init__(self, width: int = 8, length: int = 16) -> None:
        self.keys = torch.zeros(length, width)
        self.filled = torch.zeros((), dtype=torch.long)


class Toy(torch.nn.Module):
    def __init__(self, vocab: int = 32, width: int = 8, graph_break: bool = False) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.proj = torch.nn.Linear(width, width)
        self.head = torch.nn.Linear(width, vocab)
        self.graph_break = graph_break

    def forward(self, input_ids, cache, scale: float = 1.0, use_cache: bool = True):
        h = self.proj(self.embed(input_ids)) * scale
        if self.graph_break:
            torch._dynamo.graph_break()
        cache.keys.index_copy_(0, cache.filled.reshape(1), h[0, -1:])
        cache.filled.add_(1)
        context = cache.keys.sum(0) / cache.filled
        return CausalLMOutputWithPast(logits=self.head(h + context), past_key_values=cache)


def _counting(forward: CompiledForward) -> list:
    """Count the calls that enter Dynamo (the torch.compile-d function) from here on."""
    entered, compiled = [], forward.compiled

    def counted(*args, **kwargs):
        entered.append(1)
        return compiled(*args, **kwargs)

    forward.compiled = counted
    return entered


def _steps(forward, model, cache, tokens, **kwargs):
    """Logits of single-token steps through ``forward``, each checked against the eager model's on a twin cache."""
    twin = Cache()
    for token in tokens:
        ids = torch.tensor([[token]])
        got = forward(input_ids=ids, cache=cache, **kwargs)
        want = model(input_ids=ids, cache=twin, **kwargs)
        assert got.past_key_values is cache
        torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(cache.keys, twin.keys)
    return got


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_steps_after_two_that_agree_call_the_graph_directly():
    model = Toy()
    forward = CompiledForward(model.forward, None, backend="eager")
    entered = _counting(forward)
    with torch.inference_mode():
        _steps(forward, model, Cache(), range(10))
    assert len(entered) == 2 and forward.replayed == 8  # two recorded steps, then no Dynamo


def test_a_new_cache_is_recorded_again_and_the_old_ones_tensors_are_not_kept():
    model = Toy()
    forward = CompiledForward(model.forward, None, backend="eager")
    entered = _counting(forward)
    with torch.inference_mode():
        _steps(forward, model, Cache(), range(5))
        gc.collect()
        assert forward.replay.inputs is None  # the cache is gone: so are the replay's references to its tensors
        _steps(forward, model, Cache(), range(5, 10))
    assert len(entered) == 4 and forward.replayed == 6


@pytest.mark.parametrize("change", ["shape", "value", "grad mode", "positional"])
def test_a_step_unlike_the_recorded_ones_goes_through_dynamo(change):
    model = Toy()
    forward = CompiledForward(model.forward, None, backend="eager")
    entered = _counting(forward)
    cache = Cache()
    with torch.no_grad():
        _steps(forward, model, cache, range(3))
        assert len(entered) == 2 and forward.replayed == 1
        twin = Cache()
        twin.keys.copy_(cache.keys)
        twin.filled.copy_(cache.filled)
    ids, kwargs, args = torch.tensor([[4]]), {"scale": 1.0}, ()
    if change == "shape":
        ids = torch.tensor([[4], [5]])
    elif change == "value":
        kwargs["scale"] = 0.5
    elif change == "positional":
        args, ids = (ids,), None
    call_ids = {} if ids is None else {"input_ids": ids}
    with torch.enable_grad() if change == "grad mode" else torch.no_grad():
        got = forward(*args, cache=cache, **call_ids, **kwargs)
        want = model(*args, cache=twin, **call_ids, **kwargs)
    assert len(entered) == 3 and forward.replayed == 1
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=1e-6)


def test_a_forward_with_a_graph_break_is_never_replayed():
    model = Toy(graph_break=True)
    forward = CompiledForward(model.forward, None, backend="eager")
    entered = _counting(forward)
    with torch.inference_mode():
        _steps(forward, model, Cache(), range(6))
    assert len(entered) == 6 and forward.replayed == 0 and forward.replay is None
