"""qcompiler::decode_attention (lowering/kernels/cpu_attention.cpp) and the lowering that calls it in decode steps."""

from __future__ import annotations

import pytest
import torch
import torch._C._nn as nn_c
import torch.nn.functional as F
from graphs import capture_graph, count_calls, decode_step, tiny_gpt2, tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompiler.lowering.attention import decode_attention
from qcompiler.lowering.kernels import native
from qcompiler.passes.gqa_attention import gqa_attention

pytestmark = pytest.mark.skipif(native.unavailable_reason() is not None,
                                reason=f"no C++ toolchain here: {native.unavailable_reason()}")
_OP = torch.ops.qcompiler.decode_attention.default


def _sdpa(q, k, v, mask, scale):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


# d = 64 and 128 take the AVX-512 path where the CPU has it
@settings(max_examples=60, deadline=None)
@given(b=st.integers(1, 3), kv=st.integers(1, 3), group=st.integers(1, 3), length=st.integers(1, 40),
       d=st.sampled_from([1, 8, 64, 20, 128]), mask_kind=st.sampled_from(["none", "batch", "shared", "per_head"]),
       filled=st.floats(0.0, 1.0), holes=st.floats(0.0, 0.5), seed=st.integers(0, 2**16))
def test_equals_pytorchs_attention(b, kv, group, length, d, mask_kind, filled, holes, seed):
    gen = torch.Generator().manual_seed(seed)
    h = kv * group
    q = torch.randn(b, h, 1, d, generator=gen)
    k, v = torch.randn(b, kv, length, d, generator=gen), torch.randn(b, kv, length, d, generator=gen)
    shapes = {"none": None, "batch": (b, 1, 1, length), "shared": (1, 1, 1, length), "per_head": (b, h, 1, length)}
    shape = shapes[mask_kind]
    mask = None
    if shape is not None:
        # a static cache's mask: the first positions filled (some masked out as left padding), the rest empty
        filled_len = round(filled * length)
        mask = torch.zeros(shape, dtype=torch.bool)
        mask[..., :filled_len] = torch.rand(shape, generator=gen)[..., :filled_len] >= holes
    scale = 1.0 / d**0.5
    got = _OP(q, k, v, mask, scale)
    torch.testing.assert_close(got, _sdpa(q, k, v, mask, scale), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("d", [8, 64])
def test_positions_after_the_last_allowed_one_are_not_read(d):
    q, k, v = torch.randn(1, 2, 1, d), torch.randn(1, 2, 10, d), torch.randn(1, 2, 10, d)
    mask = torch.zeros(1, 1, 1, 10, dtype=torch.bool)
    mask[..., :4] = True
    k[:, :, 4:] = float("nan")  # the empty part of a cache: if it were read, the output would be NaN
    v[:, :, 4:] = float("nan")
    out = _OP(q, k, v, mask, 0.3)
    torch.testing.assert_close(out, _sdpa(q[..., :], k[:, :, :4], v[:, :, :4], None, 0.3))


@pytest.mark.parametrize("d", [8, 128])
def test_a_row_with_nothing_to_attend_to_gives_zeros_as_pytorch_does(d):
    q, k, v = torch.randn(1, 2, 1, d), torch.randn(1, 2, 5, d), torch.randn(1, 2, 5, d)
    mask = torch.zeros(1, 1, 1, 5, dtype=torch.bool)
    assert torch.equal(_OP(q, k, v, mask, 0.3), _sdpa(q, k, v, mask, 0.3))
    assert torch.equal(_OP(q, k, v, mask, 0.3), torch.zeros(1, 2, 1, d))


@pytest.mark.parametrize("bad,message", [
    (lambda q, k, v: (q.double(), k, v, None), "float32"),
    (lambda q, k, v: (torch.randn(1, 4, 2, 8), k, v, None), "one query position"),
    (lambda q, k, v: (torch.randn(1, 3, 1, 8), k, v, None), "multiple"),
    (lambda q, k, v: (q, k, v, torch.zeros(1, 1, 1, 6)), "bool mask"),
])
def test_bad_inputs_are_named(bad, message):
    q, k, v = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    with pytest.raises(RuntimeError, match=message):
        _OP(*bad(q, k, v), 0.3)


def _decode_graph(model, cache_len=16, position=5):
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=cache_len)
    with torch.no_grad():
        gm, example = capture_graph(model, torch.tensor([[7]]), past_key_values=cache, use_cache=True,
                                    cache_position=torch.tensor([position]))
    return gm, example


def test_the_lowering_rewrites_a_decode_steps_attention_and_keeps_its_output():
    model = tiny_llama()
    gm, example = _decode_graph(model)

    def fresh():  # the graph updates the cache it is given: each run gets its own copy of the inputs
        return [t.clone() if isinstance(t, torch.Tensor) else t for t in example]

    with torch.no_grad():
        expected = gm(*fresh())
        gqa_attention(gm)
        result = decode_attention(gm)
        got = gm(*fresh())
    assert result.modified and result.counts == {"decode_attention": 2}  # one per layer
    assert count_calls(gm, _OP) == 2 and count_calls(gm, nn_c.scaled_dot_product_attention) == 0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_prompts_and_other_attention_are_left_alone():
    llama = tiny_llama()
    from transformers import StaticCache

    cache = StaticCache(config=llama.config, max_cache_len=16)
    with torch.no_grad():  # a prompt of 5 tokens: more than one query position
        gm, _ = capture_graph(llama, torch.tensor([[3, 1, 4, 1, 5]]), past_key_values=cache, use_cache=True,
                              cache_position=torch.arange(5))
        gpt2, _ = capture_graph(tiny_gpt2(), torch.randint(0, 128, (1, 6)))
    for graph in (gm, gpt2):
        code = graph.code
        result = decode_attention(graph)
        assert not result.modified and result.counts == {"decode_attention": 0} and graph.code == code


@pytest.mark.inductor
def test_the_backend_lowers_decode_attention_and_matches_the_reference_kernels():
    model = tiny_llama()
    fast, rep = decode_step(model, kernels="fast")
    reference, _ = decode_step(model, kernels="reference")
    passes = {p.name: p for p in rep.passes}
    assert passes["decode_attention"].counts == {"decode_attention": 2}
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-4)
