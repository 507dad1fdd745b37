import copy

import pytest
import torch
from graphs import capture_graph, tiny_gpt2, tiny_llama

import qcompiler
from qcompiler.config import SmoothQuant
from qcompiler.core.ir import CHANNELS, LINEAR
from qcompiler.passes.attach_stats import attach_stats
from qcompiler.passes.canonicalize import canonicalize
from qcompiler.passes.smoothquant import find_groups, search_alpha, smoothing_scales, smoothquant
from qcompiler.plan import make_plan

RECIPE = qcompiler.PRESETS["w8a8-smoothquant"]


def _prepared(model, ids, sample_rows=0, use_cache=False):
    model = copy.deepcopy(model).double()
    torch._dynamo.reset()
    stats = qcompiler.calibrate(model, [ids], qcompiler.Recipe(), progress=False, sample_rows=sample_rows)
    torch._dynamo.reset()
    gm, example_inputs = (capture_graph(model, ids, use_cache=use_cache) if hasattr(model, "lm_head")
                          else capture_graph(model, ids))
    canonicalize(gm)
    make_plan(gm, RECIPE)
    attach_stats(gm, stats.raw)
    return gm, example_inputs


def _group_names(gm):
    groups, notes = find_groups(gm, ("norm", "linear", "attention"))
    return sorted((g.kind, g.name) for g in groups), notes


def test_llama_groups_are_found_from_the_graph():
    gm, _ = _prepared(tiny_llama(), torch.randint(0, 128, (1, 12)))
    names, _ = _group_names(gm)
    assert ("norm", "model.layers.0.self_attn.q_proj+model.layers.0.self_attn.k_proj+model.layers.0.self_attn.v_proj") in names
    assert ("norm", "model.layers.1.mlp.gate_proj+model.layers.1.mlp.up_proj") in names
    assert ("linear", "model.layers.0.mlp.down_proj") in names
    assert ("attention", "model.layers.1.self_attn.o_proj") in names
    assert len(names) == 8  # per layer: qkv, gate/up, up->down, attention->o


def _o_proj_inputs(model, ids, use_cache):
    """Every o_proj's input after smoothing, from the graph captured with or without a KV cache."""
    gm, example_inputs = _prepared(model, ids, use_cache=use_cache)
    result = smoothquant(gm, SmoothQuant(alpha=0.5))
    o_projs = [n for n in gm.graph.nodes if LINEAR in n.meta and n.meta[LINEAR].module.endswith("o_proj")]
    seen = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            if n in o_projs:
                seen[n.meta[LINEAR].module] = self.env[n.args[0]]
            return super().run_node(n)

    with torch.inference_mode():
        Recorder(gm).run(*example_inputs)
    return seen, result


def test_attention_groups_do_not_depend_on_the_kv_cache():
    # The cache graph writes the value projection into the cache it returns: smoothing must leave that
    # alone and give o_proj the same smoothed input as the graph without a cache (calibration's graph).
    ids = torch.randint(0, 128, (1, 12))
    model = tiny_llama()
    without, result = _o_proj_inputs(model, ids, use_cache=False)
    with_cache, cached_result = _o_proj_inputs(model, ids, use_cache=True)
    assert result.counts == cached_result.counts == {"groups": 8, "smoothed": 8}
    assert sorted(without) == sorted(with_cache) == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
    for name in without:
        torch.testing.assert_close(with_cache[name], without[name], rtol=1e-12, atol=1e-12)
    # the input is divided by s: its calibrated channel ranges are flattened, channel by channel
    assert any(float(x.abs().amax()) < 1.0 for x in without.values())


def test_kv_cache_returned_by_a_smoothed_graph_is_unchanged():
    ids = torch.randint(0, 128, (1, 12))
    gm, example_inputs = _prepared(tiny_llama(), ids, use_cache=True)
    with torch.inference_mode():
        expected = copy.deepcopy(gm)(*example_inputs)
        smoothquant(gm, SmoothQuant(alpha=0.5))
        got = gm(*example_inputs)
    leaves = list(zip(torch.utils._pytree.tree_leaves(expected), torch.utils._pytree.tree_leaves(got)))
    assert len(leaves) > 1  # logits and the cache's keys and values
    for e, g in leaves:
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9)


def test_gpt2_layernorm_groups_are_found_through_conv1d_views():
    gm, _ = _prepared(tiny_gpt2(), torch.randint(0, 128, (1, 12)))
    names, _ = _group_names(gm)
    assert ("norm", "transformer.h.0.attn.c_attn") in names and ("norm", "transformer.h.1.mlp.c_fc") in names


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("alpha", [0.5, "auto"])
def test_smoothing_preserves_the_function_in_float64(factory, alpha):
    ids = torch.randint(0, 128, (1, 12))
    gm, example_inputs = _prepared(factory(), ids, sample_rows=16)
    before = copy.deepcopy(gm)
    with torch.inference_mode():
        expected = before(*example_inputs)
        result = smoothquant(gm, SmoothQuant(alpha=alpha))
        gm.graph.lint()
        got = gm(*example_inputs)
    assert result.modified and result.counts["smoothed"] >= 2
    for e, g in zip(torch.utils._pytree.tree_leaves(expected), torch.utils._pytree.tree_leaves(got)):
        if isinstance(e, torch.Tensor) and e.is_floating_point():
            torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9)


def test_smoothed_channel_ranges_are_flatter():
    gm, _ = _prepared(tiny_llama(), torch.randint(0, 128, (1, 12)))
    consumer = next(n for n in gm.graph.nodes if LINEAR in n.meta and n.meta[LINEAR].module.endswith("0.mlp.down_proj"))
    before = consumer.meta[CHANNELS].absmax
    smoothquant(gm, SmoothQuant(alpha=1.0))
    after = consumer.meta[CHANNELS].absmax
    # alpha=1 moves all of the range into the weights: every channel's max|X| becomes 1
    assert torch.allclose(after[before > 0], torch.ones_like(after[before > 0]))


def test_scales_follow_the_formula_and_keep_dead_channels():
    act = torch.tensor([4.0, 1.0, 0.0, 9.0])
    w = torch.tensor([1.0, 4.0, 2.0, 0.0])
    s = smoothing_scales(act, w, 0.5)
    assert torch.allclose(s, torch.tensor([2.0, 0.5, 1.0, 1.0], dtype=torch.float64))


def test_alpha_search_returns_the_grid_minimum():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=gen)
    x[:, 3] *= 50
    w = torch.randn(8, 16, generator=gen)
    scheme = RECIPE.scheme_for("layer")
    best, errors = search_alpha(x, x.amin(0), x.amax(0), [w], [scheme], (0.0, 0.25, 0.5, 0.75, 1.0))
    assert errors[best] == min(errors.values())
    assert best is not None and errors[best] < errors[None]  # smoothing helps an outlier channel


def test_alpha_search_answers_again_from_its_memo_only_for_the_same_inputs(monkeypatch):
    from qcompiler.passes import smoothquant as sq

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, 16, generator=gen)
    x[:, 5] *= 40
    w = torch.randn(8, 16, generator=gen)
    scheme, grid = RECIPE.scheme_for("layer"), (0.25, 0.5, 0.75)
    first = search_alpha(x, x.amin(0), x.amax(0), [w], [scheme], grid)
    searched = []

    def counted(*args):
        searched.append(args)
        return 0.5, {0.5: 0.0}

    monkeypatch.setattr(sq, "_search_alpha", counted)
    assert search_alpha(x.clone(), x.amin(0), x.amax(0), [w.clone()], [scheme], grid) == first and not searched
    w2 = w.clone()
    w2[0, 0] += 1e-3  # any input that differs: searched again
    search_alpha(x, x.amin(0), x.amax(0), [w2], [scheme], grid)
    search_alpha(x, x.amin(0), x.amax(0), [w], [scheme], (0.25, 0.5))
    assert len(searched) == 2


def test_alpha_search_keeps_s_equal_to_one_when_nothing_helps():
    gen = torch.Generator().manual_seed(0)
    # Activations of 0 or 1 on every channel are exact on the asymmetric per-tensor grid; a weight column that is 64x
    # smaller than the rest makes every alpha < 1 grow that activation channel's range for nothing.
    x = torch.randint(0, 2, (64, 16), generator=gen).double()
    w = torch.randint(0, 2, (8, 16), generator=gen).double() * 2 - 1
    w[:, 2] /= 64
    best, errors = search_alpha(x, x.amin(0), x.amax(0), [w], [RECIPE.scheme_for("layer")], (0.25, 0.5, 0.75))
    assert best is None and errors[None] < min(errors[a] for a in (0.25, 0.5, 0.75))


def test_post_norm_outputs_feeding_a_residual_are_not_smoothed():
    from graphs import tiny_bert

    gm, _ = _prepared(tiny_bert(), torch.randint(0, 128, (1, 12)))
    names, notes = _group_names(gm)
    assert not any(kind == "norm" and "attention.self.query" in name for kind, name in names if "layer.1." in name)
    assert any("also used by" in n for n in notes)
