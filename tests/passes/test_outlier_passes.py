import copy

import pytest
import torch
from graphs import capture_graph, tiny_gpt2, tiny_llama

import qcompiler
from qcompiler.config import MixedInt8, OutlierSplit, Recipe, WeightScheme
from qcompiler.core.ir import CHANNELS, DECISION, FLOAT_SIDE_BYTES, LINEAR, PLAN, plan_of
from qcompiler.passes.attach_stats import attach_stats
from qcompiler.passes.canonicalize import canonicalize
from qcompiler.passes.insert_qdq import insert_qdq
from qcompiler.passes.mixed_int8 import mixed_int8
from qcompiler.passes.split_outliers import plan_splits, quant_aware_offsets, split_outliers
from qcompiler.plan import make_plan

RECIPE = qcompiler.PRESETS["w8a8-static"]


def _prepared(factory, ids):
    model = factory().double()
    torch._dynamo.reset()
    stats = qcompiler.calibrate(model, [ids], progress=False)
    torch._dynamo.reset()
    kwargs = {"use_cache": False} if hasattr(model, "lm_head") and factory is tiny_llama else {}
    gm, example_inputs = capture_graph(model, ids, **kwargs)
    canonicalize(gm)
    make_plan(gm, RECIPE)
    attach_stats(gm, stats.raw)
    return gm, example_inputs


def _assert_same_function(gm, example_inputs, run_pass):
    before = copy.deepcopy(gm)
    with torch.inference_mode():
        expected = before(*example_inputs)
        result = run_pass(gm)
        gm.graph.lint()
        got = gm(*example_inputs)
    for e, g in zip(torch.utils._pytree.tree_leaves(expected), torch.utils._pytree.tree_leaves(got)):
        if isinstance(e, torch.Tensor) and e.is_floating_point():
            torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9)
    return result


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_mixed_int8_decomposition_preserves_the_function(factory):
    gm, example_inputs = _prepared(factory, torch.randint(0, 128, (1, 12)))
    result = _assert_same_function(gm, example_inputs, lambda g: mixed_int8(g, MixedInt8(threshold=1.0)))
    assert result.modified and result.counts["decomposed"] > 0
    decomposed = [n for n in gm.graph.nodes if FLOAT_SIDE_BYTES in n.meta]
    assert len(decomposed) == result.counts["decomposed"]
    for node in decomposed:
        assert node.args[0].target is torch.index_select
        assert node.meta[LINEAR].in_features == node.meta[CHANNELS].channel_min.numel()
        assert float(node.meta[CHANNELS].absmax.max()) <= 1.0


def test_mixed_int8_leaves_layers_without_outliers_alone():
    gm, example_inputs = _prepared(tiny_llama, torch.randint(0, 128, (1, 12)))
    result = mixed_int8(gm, MixedInt8(threshold=1e6))
    assert not result.modified and result.counts["decomposed"] == 0


@pytest.mark.parametrize("mode", ["activation", "weight"])
@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_outlier_splitting_preserves_the_function_and_charges_the_channels(factory, mode):
    gm, example_inputs = _prepared(factory, torch.randint(0, 128, (1, 12)))
    config = OutlierSplit(mode=mode, expand_ratio=0.05)
    result = _assert_same_function(gm, example_inputs, lambda g: split_outliers(g, config))
    assert result.modified and result.counts["extra_channels"] > 0
    for node in gm.graph.nodes:
        if LINEAR in node.meta and RECIPE.scheme_for(node.meta[LINEAR].module) is not None:
            weight = getattr(gm, node.args[1].target)
            assert weight.shape[1] == node.meta[LINEAR].in_features


def test_a_split_the_group_no_longer_divides_turns_the_plan_float_on_the_node_and_the_graph():
    recipe = Recipe(name="g16", weight=WeightScheme(bits=4, granularity="per_group", group_size=16, symmetric=False))
    gm, _ = capture_graph(tiny_llama(), torch.randint(0, 128, (1, 8)), use_cache=False)
    canonicalize(gm)
    make_plan(gm, recipe)
    split_outliers(gm, OutlierSplit(mode="weight", expand_ratio=0.25))  # K 64 -> 80, K 96 (down_proj) -> 120
    sites = [n for n in gm.graph.nodes if LINEAR in n.meta]
    assert gm.meta[PLAN].layers == tuple(plan_of(n) for n in sites)
    by_width = {plan_of(n).in_features: plan_of(n) for n in sites if "lm_head" not in n.meta[LINEAR].module}
    assert set(by_width) == {80, 120}
    assert by_width[80].quantized
    assert not by_width[120].quantized and by_width[120].reason == "in_features 120 is not a multiple of group_size 16"
    assert len(gm.meta[PLAN].quantized) == sum(plan_of(n).quantized for n in sites) > 0
    insert_qdq(gm)
    for node in sites:
        assert node.meta[DECISION].quantized == plan_of(node).quantized
        if not plan_of(node).quantized and "lm_head" not in node.meta[LINEAR].module:
            assert node.meta[DECISION].reason == "in_features 120 is not a multiple of group_size 16"


def test_activation_split_halves_the_largest_channel():
    src, factor = plan_splits(torch.tensor([1.0, 8.0, 2.0]), budget=2)
    # 8 -> 4 + 4, then the first 4 -> 2 + 2: channel 1 appears three times, factors summing to 1
    assert src.tolist() == [0, 1, 2, 1, 1]
    assert factor.tolist() == [1.0, 0.25, 1.0, 0.5, 0.25]


def test_split_activation_range_shrinks():
    gm, _ = _prepared(tiny_llama, torch.randint(0, 128, (1, 12)))
    node = next(n for n in gm.graph.nodes if LINEAR in n.meta and n.meta[LINEAR].module.endswith("0.mlp.down_proj"))
    before = float(node.meta[CHANNELS].absmax.max())
    split_outliers(gm, OutlierSplit(mode="activation", expand_ratio=0.05))
    assert float(node.meta[CHANNELS].absmax.max()) < before


def test_quant_aware_halves_round_to_different_grid_points():
    # a weight that halves onto a rounding midpoint: w/2 = 2.5 steps
    row = torch.tensor([[5.0, 127.0]], dtype=torch.float64)
    src = torch.tensor([0, 1, 0])
    halves = row[:, src] * torch.tensor([0.5, 1.0, 0.5], dtype=torch.float64)
    offset = quant_aware_offsets(halves, src, qmax=127)
    step = 1.0  # max |w| = 127 -> one unit per step
    assert offset[0, 0] + offset[0, 2] == pytest.approx(5.0)
    q = torch.round(offset / step)
    naive = torch.round(halves / step)
    assert q[0, 0] + q[0, 2] == 5.0  # quantization-aware: the split keeps w on the grid
    assert naive[0, 0] + naive[0, 2] == 4.0  # naive halves both round 2.5 -> 2
