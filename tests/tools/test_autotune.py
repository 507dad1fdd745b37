"""The automatic mixed-precision search on stories260K: the budget holds, the bits are the backend's,
a layer's sensitivity is what compiling that layer alone gives, the recipe compiles and round-trips,
a rerun reads the cache."""

import json
import math

import pytest
import torch

import qcompiler
from qcompiler.config import GPTQ, HQQ, Recipe, recipe_from_json, recipe_to_json
from qcompiler.config.auto import CANDIDATES, EMBEDDINGS, AutoPrecision, uniform_recipe
from qcompiler.core.errors import ConfigError, StatsError
from qcompiler.tools import models
from qcompiler.tools.autotune import measure
from qcompiler.tools.autotune.search import auto_recipe
from qcompiler.tools.metrics import next_token_divergence
from qcompiler.tools.model_bits import model_bits, model_bits_per_weight

CANDIDATE_NAMES = ("float", "w8-channel", "w4-g64", "w3-g64")


@pytest.fixture(scope="module")
def stories():
    loaded = models.load_model("stories260k")
    ids = torch.randint(3, loaded.model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    return loaded.model, ids


@pytest.fixture(scope="module")
def searched(stories, tmp_path_factory):
    model, ids = stories
    cache = tmp_path_factory.mktemp("cache")
    auto = AutoPrecision(8.0, candidates=CANDIDATE_NAMES)
    return auto_recipe(model, auto, [ids], cache=cache, progress=False), cache


def _compile_and_run(model, recipe, ids, kernels="fast"):
    torch._dynamo.reset()
    qcompiler.clear_reports()
    compiled = torch.compile(model, backend="qcompiler", options={"recipe": recipe, "kernels": kernels})
    with torch.inference_mode():
        logits = compiled(input_ids=ids, use_cache=False).logits
    return logits, qcompiler.last_report()


def test_the_recipe_fits_the_budget_and_its_bits_are_the_backends_own(stories, searched):
    model, ids = stories
    result, _ = searched
    params = [p for p in model.parameters()]
    assert result.weights == sum(p.numel() for p in params)
    assert result.bits <= 8.0 * result.weights and result.bits_per_weight <= 8.0
    assert len({c.candidate for c in result.layers}) >= 2  # a real mix at this budget
    logits, report = _compile_and_run(model, result.recipe, ids)
    assert torch.isfinite(logits).all()
    decisions = {d.module: d for d in report.layers}
    for choice in result.layers:
        if choice.module == EMBEDDINGS:  # stories260K: one table, tied to the LM head
            d = decisions["model.embed_tokens"]
            assert d.quantized == (choice.candidate != "float"), choice
            if d.quantized:  # a table that reads the LM head's quantized weight adds nothing
                assert (0 if d.shared_with else 8 * d.weight_bytes) == choice.bits and d.scheme.endswith("(embedding)")
                head = next(c for c in result.layers if c.module == "lm_head")
                assert bool(d.shared_with) == (head.candidate == choice.candidate
                                               and "lm_head" in result.shared[choice.candidate])
            continue
        d = decisions[choice.module]
        assert d.quantized == (choice.candidate != "float"), choice
        if d.quantized:
            assert 8 * d.weight_bytes == choice.bits and d.scheme == CANDIDATES[choice.candidate].describe()
    # the whole model as the report counts it: every parameter once, the tied table's float bits unless
    # both the embedding and the LM head are quantized
    assert result.bits == model_bits(model, report.layers)
    assert result.bits_per_weight == pytest.approx(model_bits_per_weight(model, report.layers), rel=1e-12)


def test_a_layers_sensitivity_is_the_kl_of_compiling_that_layer_alone(stories, searched):
    model, ids = stories
    result, _ = searched
    module = "model.layers.2.mlp.up_proj"
    others = tuple(c.module for c in result.layers if c.module != module)
    alone = Recipe(weight=CANDIDATES["w4-g64"].weight, activation=None, skip=("*embed*", *others))
    with torch.inference_mode():
        reference = model(input_ids=ids, use_cache=False).logits
    logits, report = _compile_and_run(model, alone, ids, kernels="reference")
    assert [d.module for d in report.quantized] == [module]
    kl = next_token_divergence(reference, logits)[0].mean().item()
    assert result.table["w4-g64"][module][1] == pytest.approx(kl, rel=1e-4, abs=1e-9)
    # fewer bits, more error: summed over the layers, 4 bits hurt more than 8
    total = {name: sum(s for _, s in result.table[name].values()) for name in CANDIDATE_NAMES[:3]}
    assert total["float"] == 0 < total["w8-channel"] < total["w4-g64"]
    # 3-bit groups are stored at 3 bits (the kernels hold them in nibbles): fewer bits than 4-bit ones, more error
    assert not result.pruned and "w3-g64" in result.table
    w3, w4 = result.table["w3-g64"], result.table["w4-g64"]
    assert sum(s for _, s in w3.values()) > total["w4-g64"]
    assert all(w3[m][0] <= w4[m][0] for m in w4) and sum(b for b, _ in w3.values()) < sum(b for b, _ in w4.values())


def test_the_tables_sensitivity_is_the_kl_of_quantizing_the_tables_alone(stories, searched):
    model, ids = stories
    result, _ = searched
    with torch.inference_mode():
        reference = model(input_ids=ids, use_cache=False).logits
    alone = Recipe(skip=("*",), embedding=CANDIDATES["w4-g64"].weight)
    logits, report = _compile_and_run(model, alone, ids, kernels="reference")
    assert [d.module for d in report.quantized] == ["model.embed_tokens"]
    kl = next_token_divergence(reference, logits)[0].mean().item()
    assert result.table["w4-g64"][EMBEDDINGS][1] == pytest.approx(kl, rel=1e-4, abs=1e-9) and kl > 0
    assert EMBEDDINGS not in result.table.get("w8a8-dynamic", {})  # a lookup has no activation to quantize


def test_the_searchs_kl_is_next_token_divergence_to_float64_rounding():
    gen = torch.Generator().manual_seed(0)
    reference = 3 * torch.randn(2, 7, 300, generator=gen)
    error = measure.OutputError(reference, "kl")
    for scale in (1e-4, 1e-2, 1.0):
        output = reference + scale * torch.randn(reference.shape, generator=gen)
        expected = next_token_divergence(reference, output)[0].mean().item()
        assert error(output) == pytest.approx(expected, rel=1e-9, abs=1e-14)
    mse = measure.OutputError(reference, "mse")(reference + 0.1)
    assert mse == pytest.approx(0.01 / reference.double().var().item(), rel=1e-5)  # + 0.1 rounded in float32


def test_a_candidate_that_fits_a_layer_to_a_measured_scheme_is_not_measured_again(stories, tmp_path, monkeypatch):
    """stories260K's layers are 64 wide (down_proj 172 = 4 x 43): w4-g128 fits them to groups of 64, which
    w4-g64 measured already; down_proj (172 wide) is asked again (neither group divides it: float either way)."""
    model, ids = stories
    asked = {}
    real = measure.candidate_sensitivity

    def counting(gm0, calls, references, auto, candidate, modules, progress=True, stats=None):
        asked[candidate.name] = list(modules)
        return real(gm0, calls, references, auto, candidate, modules, progress, stats=stats)

    monkeypatch.setattr(measure, "candidate_sensitivity", counting)
    auto = AutoPrecision(12.0, candidates=("float", "w4-g64", "w4-g128"))
    result = auto_recipe(model, auto, [ids], cache=tmp_path, progress=False)
    assert len(asked["w4-g64"]) == len(result.layers)
    assert asked["w4-g128"] == [c.module for c in result.layers if c.module.endswith("down_proj")]
    assert result.table["w4-g128"] == result.table["w4-g64"]


def test_the_saved_recipe_loads_and_compiles_to_the_same_logits(stories, searched, tmp_path):
    model, ids = stories
    result, _ = searched
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recipe_to_json(result.recipe)))
    loaded = recipe_from_json(json.loads(path.read_text()))
    assert loaded == result.recipe
    first, _ = _compile_and_run(model, result.recipe, ids)
    again, _ = _compile_and_run(model, loaded, ids)
    assert torch.equal(first, again)


def test_a_rerun_reads_every_number_from_the_cache(stories, searched, monkeypatch):
    model, ids = stories
    result, cache = searched
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].name.startswith("autotune-")

    def measured(*args, **kwargs):
        raise AssertionError("measured again instead of reading the cache")

    monkeypatch.setattr(measure, "candidate_sensitivity", measured)
    monkeypatch.setattr(measure, "candidate_bits", measured)
    again = auto_recipe(model, AutoPrecision(8.0, candidates=CANDIDATE_NAMES), [ids], cache=cache, progress=False)
    assert again.layers == result.layers and again.recipe == result.recipe
    # another budget reuses the same measurements and never costs more bits than it is given
    tighter = auto_recipe(model, AutoPrecision(7.0, candidates=CANDIDATE_NAMES), [ids], cache=cache, progress=False)
    assert tighter.bits_per_weight <= 7.0 and tighter.sensitivity >= result.sensitivity


def test_a_budget_below_the_cheapest_assignment_names_the_least_bits_per_weight(stories, searched):
    model, ids = stories
    result, cache = searched
    table = model.model.embed_tokens.weight  # tied to the LM head: its float bits count unless both are quantized
    shared = 8 * table.numel() * table.element_size()
    offered = [n for n in CANDIDATE_NAMES if n in result.table]
    pair = min(result.table[e][EMBEDDINGS][0] + result.table[h]["lm_head"][0] + shared * ("float" in (e, h))
               - (e == h) * result.shared.get(e, {}).get("lm_head", 0) for e in offered for h in offered)
    rest = sum(min(result.table[n][c.module][0] for n in offered)
               for c in result.layers if c.module not in (EMBEDDINGS, "lm_head"))
    least = (result.fixed_bits + pair + rest) / result.weights
    with pytest.raises(ConfigError, match=rf"target_bpw 4 is below .*: {math.ceil(least * 1e4) / 1e4:.4f} bits per weight"):
        auto_recipe(model, AutoPrecision(4.0, candidates=CANDIDATE_NAMES), [ids], cache=cache, progress=False)


def test_a_cache_of_another_model_or_not_json_is_an_error_naming_the_file(stories, searched):
    model, ids = stories
    _, cache = searched
    path = next(cache.iterdir())
    saved = path.read_text()
    try:
        doc = json.loads(saved)
        path.write_text(json.dumps({**doc, "model": "0" * 64}))
        with pytest.raises(StatsError, match="another model"):
            auto_recipe(model, AutoPrecision(8.0, candidates=CANDIDATE_NAMES), [ids], cache=cache, progress=False)
        path.write_text("{not json")
        with pytest.raises(StatsError, match=f"{path.name} is not readable JSON.*delete"):
            auto_recipe(model, AutoPrecision(8.0, candidates=CANDIDATE_NAMES), [ids], cache=cache, progress=False)
    finally:
        path.write_text(saved)


def test_a_latency_budget_holds_on_the_timed_layers(stories, searched, monkeypatch):
    """With made-up timings (4-bit layers slow, 8-bit fast) the budget changes the answer and holds; then
    once with this machine's timings."""
    from dataclasses import replace

    from qcompiler.tools.autotune import latency

    model, ids = stories
    result, cache = searched
    modules = [c.module for c in result.layers if c.module != EMBEDDINGS]
    fake = {"float": 1.0, "w8-channel": 0.5, "w4-g64": 2.0, "w3-g64": 2.0}
    monkeypatch.setattr(latency, "candidate_latencies", lambda gm0, auto, mods, device, progress=True: (
        {c: {m: t for m in mods} for c, t in fake.items()}, {m: 1.0 for m in mods}))
    linears = [c for c in result.layers if c.module != EMBEDDINGS]  # a table lookup is not timed: 0 seconds
    unlimited = sum(fake[c.candidate] for c in linears) / len(linears)  # the answer without a budget
    ratio = 0.95 * unlimited
    auto = replace(result.auto, max_latency_ratio=ratio)
    limited = auto_recipe(model, auto, [ids], cache=cache, progress=False)
    lat = limited.latency
    assert lat["ratio"] <= ratio + 1e-9 and lat["seconds"] == pytest.approx(
        sum(fake[c.candidate] for c in limited.layers if c.module != EMBEDDINGS))
    assert limited.bits <= 8.0 * limited.weights and lat["gap"] >= 0
    slow = sum(c.candidate.startswith(("w4", "w3")) for c in limited.layers)
    assert slow < sum(c.candidate.startswith(("w4", "w3")) for c in result.layers)  # the budget bound
    assert "decode-step time of the searched layers" in str(limited)
    assert json.loads(json.dumps(limited.to_json()))["max_latency_ratio"] == ratio
    with pytest.raises(ConfigError, match="the fastest reaches"):
        auto_recipe(model, replace(result.auto, max_latency_ratio=0.1), [ids], cache=cache, progress=False)
    monkeypatch.undo()

    times, float_times = latency.candidate_latencies(
        measure_graph(model, ids), result.auto, modules[:3], torch.device("cpu"), repeats=3, progress=False)
    assert set(times) == set(CANDIDATE_NAMES) and all(t > 0 for per in times.values() for t in per.values())
    assert times["float"] == float_times  # a float layer is timed as the float reference


def measure_graph(model, ids):
    from qcompiler import pipeline
    from qcompiler.config.auto import CANDIDATES, uniform_recipe
    from qcompiler.core import capture
    from qcompiler.report import CompileReport

    gm, calls = capture.capture(model, [capture.as_batch(ids)], what="test")
    capture.bind_parameters(gm, calls[0])
    steps = pipeline.transform_steps(uniform_recipe(AutoPrecision(8.0), CANDIDATES["float"]), None)
    return pipeline.run(gm, steps, CompileReport(0, "", ""))


def test_the_replay_runs_from_each_layers_cut_and_refuses_graphs_that_write_in_place():
    import operator

    from torch import fx

    from qcompiler.tools.autotune.replay import Replay, _in_place

    graph = fx.Graph()
    x = graph.placeholder("x")
    nodes = {"and": graph.call_function(operator.and_, (x, x)), "iadd": graph.call_function(operator.iadd, (x, x)),
             "add_": graph.call_method("add_", (x, 1)), "setitem": graph.call_function(operator.setitem, (x, 0, 1)),
             "relu": graph.call_function(torch.relu, (x,)), "dunder": graph.call_method("__add__", (x, 1))}
    assert {k for k, n in nodes.items() if _in_place(n)} == {"iadd", "add_", "setitem"}
    model, ids = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)), torch.randn(4, 8)
    gm = fx.symbolic_trace(model)
    assert not Replay(gm, [ids]).whole


def test_an_encoders_tables_are_one_choice_and_its_bits_are_the_compiled_models(tmp_path):
    """BERT-style: word, position and token-type tables (none tied) searched as one item, metric mse."""
    from tests.graphs import tiny_bert

    model = tiny_bert()
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    least = auto_recipe(model, AutoPrecision(60.0, candidates=("float", "w8-channel", "w4-g64"), metric="mse"),
                        [ids], cache=tmp_path, progress=False)
    table_elements = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    assert least.layers[0].module == EMBEDDINGS and least.layers[0].candidate == "float"  # room for everything
    tight = auto_recipe(model, AutoPrecision(9.0, candidates=("float", "w8-channel", "w4-g64"), metric="mse"),
                        [ids], cache=tmp_path, progress=False)
    tables = tight.layers[0]
    assert tables.module == EMBEDDINGS and tables.candidate != "float" and tables.sensitivity > 0
    assert tight.recipe.embedding == CANDIDATES[tables.candidate].weight
    torch._dynamo.reset()
    qcompiler.clear_reports()
    compiled = torch.compile(model, backend="qcompiler", options={"recipe": tight.recipe})
    with torch.inference_mode():  # 10 sequences: the pooler's 10 rows take the batch kernels, as the search counts
        compiled(ids.repeat(5, 1))
    report = qcompiler.last_report()
    quantized_tables = [d for d in report.quantized if d.scheme.endswith("(embedding)")]
    assert len(quantized_tables) == 3 and sum(8 * d.weight_bytes for d in quantized_tables) == tables.bits
    assert tight.bits == model_bits(model, report.layers) and tight.bits_per_weight <= 9.0
    assert tables.bits < 32 * table_elements


def test_gptq_rounding_calibrates_each_candidate_on_the_search_batches(stories, searched):
    """AutoPrecision(rounding=GPTQ()): every quantized candidate (int8 too) is rounded by GPTQ on the search's
    batches, which lowers each candidate's summed sensitivity against round to nearest; the recipe says GPTQ."""
    model, ids = stories
    rtn, _ = searched
    auto = AutoPrecision(8.0, candidates=CANDIDATE_NAMES, rounding=GPTQ())
    assert uniform_recipe(auto, CANDIDATES["w8-channel"]).rounding == GPTQ()
    assert uniform_recipe(auto, CANDIDATES["float"]).rounding is None
    assert uniform_recipe(AutoPrecision(8.0, rounding=HQQ()), CANDIDATES["w8-channel"]).rounding is None
    result = auto_recipe(model, auto, [ids], cache=None, progress=False)
    assert isinstance(result.recipe.rounding, GPTQ)
    for name in ("w8-channel", "w4-g64"):
        linears = [m for m in result.table[name] if m != EMBEDDINGS]
        assert sum(result.table[name][m][1] for m in linears) < sum(rtn.table[name][m][1] for m in linears)
        assert all(result.table[name][m][0] == rtn.table[name][m][0] for m in linears)  # the same bits
    assert result.shared["w4-g64"] == {}  # a GPTQ-rounded head's integers are not the table's


@pytest.mark.parametrize("table_on, head_on", [("w4-g128", "w4-g64"), ("w8-channel", "w8a8-dynamic")])
def test_a_tied_pair_on_two_candidates_that_store_alike_is_priced_as_one_copy(stories, table_on, head_on):
    """stories260K is 64 wide: w4-g128 is fitted to w4-g64; w8a8-dynamic's weights are w8-channel's. The pass
    shares the head's integers with the table; the knapsack's price of that pair is the compiled model's."""
    from qcompiler.config.auto import recipe_for
    from qcompiler.tools.autotune import search

    model, ids = stories
    auto = AutoPrecision(8.0, candidates=("float", "w8a8-dynamic", "w8-channel", "w4-g128", "w4-g64"))
    gm0, calls = search._captured(model, [ids])
    acc = measure.accounting(model, gm0, calls[0], auto)
    bits_graph = search._captured(model, [search._batch_rows([ids], search.GEMV_MAX_ROWS + 1)])
    for c in auto.candidates:
        acc.bits[c.name], acc.shared[c.name] = measure.candidate_bits(bits_graph[0], bits_graph[1][0], auto, c,
                                                                      acc.layers, torch.device("cpu"))
    assignment = {layer.module: "float" for layer in acc.layers}
    assignment.update({EMBEDDINGS: table_on, "lm_head": head_on})
    table = {c: {m: (b, 0.0) for m, b in per.items()} for c, per in acc.bits.items()}
    price = acc.fixed_bits
    for item in search.items(acc, auto, table):
        price += next(b for b, _, combo in item.options if combo == tuple(assignment[m] for m in item.modules))
    recipe = recipe_for(auto, assignment)
    _, report = _compile_and_run(model, recipe, ids)
    table_decision = next(d for d in report.layers if d.module == "model.embed_tokens")
    assert table_decision.shared_with == "lm_head"
    assert price == model_bits(model, report.layers)


def test_the_saved_artifact_holds_exactly_the_bits_the_search_counts(stories, searched, tmp_path):
    from safetensors import safe_open

    from qcompiler.tools import quantize

    model, ids = stories
    result, _ = searched
    folder = quantize.quantize(model, result.recipe, ids[:1], tmp_path / "art", errors=False)
    manifest = json.loads((folder / "manifest.json").read_text())
    with safe_open(str(folder / "weights.safetensors"), "pt") as f:  # what the file holds, tensor by tensor
        nbytes = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    assert manifest["size"]["tensor_bytes"] == nbytes and manifest["size"]["extra_bytes"] == 0
    assert 8 * nbytes == result.bits and manifest["size"]["bits_per_weight"] == result.bits_per_weight
    # the file is the whole model: the quantized weights packed, every float parameter the graph reads once
    size = (folder / "weights.safetensors").stat().st_size
    assert nbytes < size < nbytes + 64 * 1024  # beside the tensors, only safetensors' JSON header
    torch._dynamo.reset()
    with torch.inference_mode():
        direct = torch.compile(model, backend="qcompiler",
                               options={"recipe": result.recipe, "kernels": "reference"})(input_ids=ids).logits
        torch._dynamo.reset()
        loaded = qcompiler.load(folder, model, kernels="reference")(input_ids=ids).logits
    assert torch.equal(direct, loaded)
