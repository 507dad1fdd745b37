import copy
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from graphs import tiny_llama, token_batches

import qcompiler
from qcompiler.calibration.stats import JSON_FILE, TENSORS_FILE, CalibrationStats
from qcompiler.core import integrity, primitives
from qcompiler.core.errors import CalibrationError, StatsError


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    qcompiler.clear_reports()


@pytest.fixture(scope="module")
def llama_and_stats():
    torch._dynamo.reset()
    model = tiny_llama()
    return model, qcompiler.calibrate(model, token_batches(), progress=False)


def _linear_inputs_by_hooks(model, batches):
    """Independent reference: min/max of each nn.Linear input seen by forward pre-hooks in eager mode."""
    seen = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            def hook(mod, args, name=name):
                x = args[0]
                lo, hi = seen.get(name, (float("inf"), float("-inf")))
                seen[name] = (min(lo, float(x.min())), max(hi, float(x.max())))
            hooks.append(module.register_forward_pre_hook(hook))
    with torch.inference_mode():
        for b in batches:
            model(b, use_cache=False)
    for h in hooks:
        h.remove()
    return seen


def test_calibration_min_max_matches_eager_hooks(llama_and_stats):
    model, stats = llama_and_stats
    expected = _linear_inputs_by_hooks(model, token_batches())
    assert set(stats.activations) == set(expected) - {"lm_head"}  # the recipe skips lm_head
    for name, r in stats.activations.items():
        assert (float(r.min), float(r.max)) == pytest.approx(expected[name], rel=1e-6), name
        assert r.batches == 3
        assert r.channel_max.numel() == model.get_submodule(name).in_features
    assert stats.info["batches"] == 3 and stats.info["tokens"] == 48


def test_calibration_changes_neither_weights_nor_outputs():
    model = tiny_llama()
    state = copy.deepcopy(model.state_dict())
    ids = torch.randint(0, 128, (1, 12))
    with torch.inference_mode():
        before = model(ids).logits
    qcompiler.calibrate(model, token_batches(), progress=False)
    with torch.inference_mode():
        after = model(ids).logits
    assert torch.equal(before, after)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_stats_save_load_round_trip(llama_and_stats, tmp_path):
    _, stats = llama_and_stats
    stats.save(tmp_path / "s")
    loaded = CalibrationStats.load(tmp_path / "s")
    assert set(loaded.activations) == set(stats.activations)
    for name, r in stats.activations.items():
        other = loaded[name]
        for field in ("min", "max", "ema_min", "ema_max", "channel_min", "channel_max", "hist_counts", "hist_exponent"):
            assert torch.equal(getattr(r, field), getattr(other, field)), (name, field)
        assert r.batches == other.batches
    assert loaded.info["batches"] == 3
    with pytest.raises(TypeError):
        loaded.activations["x"] = None  # immutable


def test_corrupted_or_mismatched_stats_files_are_clear_errors(llama_and_stats, tmp_path):
    _, stats = llama_and_stats
    folder = stats.save(tmp_path / "s")
    with pytest.raises(StatsError, match="not a calibration folder"):
        CalibrationStats.load(tmp_path / "nothing")
    data = (folder / TENSORS_FILE).read_bytes()
    (folder / TENSORS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(StatsError, match="corrupted"):
        CalibrationStats.load(folder)
    folder = stats.save(tmp_path / "t")
    (folder / JSON_FILE).write_text("{not json")
    with pytest.raises(StatsError, match="not valid JSON"):
        CalibrationStats.load(folder)
    folder = stats.save(tmp_path / "u")
    doc = json.loads((folder / JSON_FILE).read_text())
    doc["layers"]["extra.layer"] = {"index": 999, "batches": 1, "min": 0, "max": 1}
    (folder / JSON_FILE).write_text(json.dumps(doc))
    with pytest.raises(StatsError, match="changed after it was written"):  # the JSON's own checksum
        CalibrationStats.load(folder)
    (folder / JSON_FILE).write_text(json.dumps(integrity.seal(doc)))  # consistent, but not with the tensors
    with pytest.raises(StatsError, match="do not match"):
        CalibrationStats.load(folder)


def test_bad_calibration_input_is_a_clear_error():
    model = tiny_llama()
    with pytest.raises(CalibrationError, match="no calibration batches"):
        qcompiler.calibrate(model, [], progress=False)
    with pytest.raises(CalibrationError, match="not supported"):
        qcompiler.calibrate(model, ["some text"], progress=False)
    with pytest.raises(CalibrationError, match="not a single Tensor"):
        qcompiler.calibrate(model, torch.randint(0, 128, (1, 8)), progress=False)
    with pytest.raises(CalibrationError, match="no linear layers"):
        qcompiler.calibrate(torch.nn.Sequential(torch.nn.ReLU()), [torch.randn(2, 3)], progress=False)


def test_nan_seen_by_an_observer_names_the_layer():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    bad = torch.tensor([[1.0, float("nan"), 0.0, 2.0]])
    with pytest.raises(CalibrationError, match="layer '0'"):
        qcompiler.calibrate(model, [bad], recipe=qcompiler.Recipe(skip=()), progress=False)


def test_static_recipe_without_stats_or_with_foreign_stats_is_a_clear_error(llama_and_stats):
    with pytest.raises(ValueError, match="needs calibration statistics"):
        qcompiler.BackendOptions.from_user({"recipe": "w8a8-static"})
    _, stats = llama_and_stats
    partial = CalibrationStats({k: v for k, v in stats.activations.items() if "layers.1." not in k})
    model = tiny_llama()
    with pytest.raises(Exception, match=r"no entry for 7 layer\(s\).*model.layers.1.mlp.down_proj"):
        with torch.inference_mode():
            torch.compile(model, backend="qcompiler",
                          options={"recipe": "w8a8-static", "stats": partial})(torch.randint(0, 128, (1, 8)))


def test_static_qdq_graph_uses_the_calibrated_per_tensor_range(llama_and_stats):
    model, stats = llama_and_stats
    # one linear, checked by hand: asymmetric uint8 range from the minmax observer
    r = stats["model.layers.0.mlp.down_proj"]
    scale, zp = primitives.qparams_from_range(r.min, r.max, 0, 255, False)
    x = torch.randn(1, 5, 96) * float(r.max) / 3
    expected_x = (torch.clamp(torch.round(x / scale) + zp, 0, 255) - zp) * scale
    lin = model.get_submodule("model.layers.0.mlp.down_proj")
    w_fq = primitives.fake_quantize(lin.weight, primitives.per_channel(2, 0))
    expected = F.linear(expected_x, w_fq)

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Module()
            self.model.layers = torch.nn.ModuleList([torch.nn.Module()])
            self.model.layers[0].mlp = torch.nn.Module()
            self.model.layers[0].mlp.down_proj = lin

        def forward(self, x):
            return self.model.layers[0].mlp.down_proj(x)

    with torch.inference_mode():
        got = torch.compile(One(), backend="qcompiler",
                            options={"recipe": "w8a8-static", "stats": stats, "kernels": "reference"})(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("preset", ["w8a8-static", "w8a8-static-mse", "w8a8-static-percentile", "w8a8-static-kl"])
def test_static_kernels_equal_the_reference_and_never_mutate_inputs(llama_and_stats, preset, tmp_path):
    model, stats = llama_and_stats
    folder = stats.save(tmp_path / "stats")
    ids = torch.randint(0, 128, (2, 12))
    ids_copy = ids.clone()
    with torch.inference_mode():
        ref = torch.compile(model, backend="qcompiler",
                            options={"recipe": preset, "stats": stats, "kernels": "reference"})(ids).logits
        torch._dynamo.reset()
        fast = torch.compile(model, backend="qcompiler", options={"recipe": preset, "stats": str(folder)})(ids).logits
    rep = qcompiler.last_report()
    assert {p.name: p.counts for p in rep.passes}["lower"] == {"lowered": 14, "not_lowered": 0}
    assert all("static" in d.scheme for d in rep.quantized)
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(ids, ids_copy)


def test_symmetric_static_activations_use_int8():
    recipe = qcompiler.Recipe(name="sym-static", activation=qcompiler.ActivationScheme(
        granularity="per_tensor", dynamic=False, symmetric=True))
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval()
    stats = qcompiler.calibrate(model, [torch.randn(4, 16) for _ in range(3)], recipe, progress=False)
    x = torch.randn(3, 16)
    with torch.inference_mode():
        ref = torch.compile(model, backend="qcompiler",
                            options={"recipe": recipe, "stats": stats, "kernels": "reference"})(x)
        torch._dynamo.reset()
        fast = torch.compile(model, backend="qcompiler", options={"recipe": recipe, "stats": stats})(x)
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)
    assert {p.name: p.counts for p in qcompiler.last_report().passes}["lower"]["lowered"] == 2


def _mlp(hidden: int, width: int = 64):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(width, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 8)).eval()


@pytest.mark.parametrize("recipe, message", [
    ("w8a8-static", r"statistics of '2' have 64 input channels, the model's layer has 96: these stats come from "
                    r"another model; calibrate this one"),
    ("w4a16-gptq", r"0: the rounded weight has shape \(64, 64\), the layer \(96, 64\)\. Calibrate this model"),
], ids=["static-ranges", "gptq-weights"])
def test_stats_of_another_model_with_the_same_layer_names_are_a_clear_error(recipe, message):
    recipe = dataclasses.replace(qcompiler.config.resolve_recipe(recipe), skip=())
    stats = qcompiler.calibrate(_mlp(64), [torch.randn(4, 64) for _ in range(2)], recipe, progress=False)
    other = _mlp(96)  # same module names "0" and "2", different widths
    with pytest.raises(Exception, match=message) as info:
        with torch.inference_mode():
            torch.compile(other, backend="qcompiler", options={"recipe": recipe, "stats": stats})(torch.randn(3, 64))
    assert isinstance(getattr(info.value, "inner_exception", info.value), StatsError)  # Dynamo wraps it




def test_two_models_compiled_with_their_own_stats_in_one_process():
    # Dynamo compares a cached graph's options with the new ones when its guards pass but the backend
    # differs (here: Sequential.forward, compiled for the first model): comparing the statistics must
    # not compare their tensors (it raised "Boolean value of Tensor with more than one value is ambiguous")
    x = torch.randn(3, 16)
    batches = [torch.randn(4, 16) for _ in range(2)]
    models, outputs = [], []  # the first model stays alive, and so does its cached graph
    for _ in range(2):
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval()
        models.append(model)
        stats = qcompiler.calibrate(model, batches, "w8a8-static", progress=False)
        with torch.inference_mode():
            outputs.append(torch.compile(model, backend="qcompiler",
                                         options={"recipe": "w8a8-static", "stats": stats})(x))
    assert len(qcompiler.reports()) == 2 and not torch.equal(outputs[0], outputs[1])


def test_a_flipped_byte_in_saved_statistics_and_stats_of_other_weights_are_refused(llama_and_stats, tmp_path):
    model, stats = llama_and_stats
    folder = stats.save(tmp_path / "s")
    blob = bytearray((folder / TENSORS_FILE).read_bytes())
    blob[-2] ^= 0x40  # a value changes, the file stays well-formed safetensors
    (folder / TENSORS_FILE).write_bytes(bytes(blob))
    with pytest.raises(StatsError, match="does not match the checksum"):
        CalibrationStats.load(folder)
    other = tiny_llama(seed=1)  # same names and shapes, other weights
    x = torch.randint(0, 128, (1, 8))
    with torch.inference_mode():
        torch._dynamo.reset()
        with pytest.raises(Exception, match="gathered on other weights"):
            torch.compile(other, backend="qcompiler", options={"recipe": "w8a8-static", "stats": stats})(x)
        torch._dynamo.reset()
        out = torch.compile(other, backend="qcompiler",
                            options={"recipe": "w8a8-static", "stats": stats, "other_weights": True})(x)
    assert out.logits.isfinite().all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_a_nan_weight_keeps_only_its_layer_float_named_and_the_report_kept(bad):
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = bad
    qcompiler.clear_reports()
    torch._dynamo.reset()
    with torch.inference_mode():
        torch.compile(model, backend="qcompiler", options={"recipe": "w8a8-dynamic"})(torch.randint(0, 128, (1, 8)))
    rep = qcompiler.last_report()
    assert rep.error == ""
    floats = {d.module: d.reason for d in rep.layers if not d.quantized}
    assert "inf/NaN" in floats["model.layers.1.mlp.down_proj"]
    assert [m for m, why in floats.items() if "inf/NaN" in why] == ["model.layers.1.mlp.down_proj"]
    assert len(rep.quantized) == 13  # the 14 linears of the two blocks but that one (lm_head in the skip list)


@pytest.mark.parametrize("recipe", ["w4a16-gptq", "w4a16-awq"])
def test_nan_activations_under_gptq_and_awq_name_the_layer_and_the_batch(recipe):
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.fill_(float("nan"))  # NaN flows into what follows
    batches = [torch.randint(0, 128, (1, 16)) for _ in range(2)]
    torch._dynamo.reset()
    with pytest.raises(CalibrationError, match=r"layer 'model\.layers\.0\.mlp\.(gate|up)_proj'.*batch"):
        qcompiler.calibrate(model, batches, recipe, progress=False)


@pytest.mark.parametrize("recipe", ["w4a16-gptq", "w4a16-awq"])
def test_nan_activations_in_one_batch_name_that_batch(recipe):
    model = tiny_llama()
    with torch.no_grad():
        model.model.embed_tokens.weight[127] = float("nan")  # only a batch holding token 127 meets NaN
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 127, (1, 16), generator=gen) for _ in range(3)]
    batches[1][0, 7] = 127
    torch._dynamo.reset()
    with pytest.raises(CalibrationError, match=r"layer 'model\.layers\.0\.self_attn\.[qkv]_proj' holds inf/NaN "
                                               r"on batch 1;"):
        qcompiler.calibrate(model, batches, recipe, progress=False)


def test_layers_that_read_one_value_are_observed_once_and_keep_their_own_statistics(monkeypatch):
    from qcompiler.calibration.observers import ActivationObserver

    calls = []
    observe = ActivationObserver.observe
    monkeypatch.setattr(ActivationObserver, "observe", lambda self, x: (calls.append(self.name), observe(self, x)))
    stats = qcompiler.calibrate(tiny_llama(), token_batches(), progress=False)
    # 3 batches x 2 blocks x 4 values: the attention's input (q, k, v), o_proj's, the MLP's (gate, up), down_proj's
    assert len(calls) == 3 * 2 * 4 and len(stats.activations) == 2 * 7
    q, k, v = (stats.activations[f"model.layers.1.self_attn.{p}_proj"] for p in "qkv")
    for field in ("channel_min", "channel_max", "hist_counts", "ema_max"):
        assert torch.equal(getattr(q, field), getattr(k, field)) and torch.equal(getattr(q, field), getattr(v, field))
        assert getattr(q, field).data_ptr() != getattr(k, field).data_ptr()  # each layer's own copy (saved apart)


def test_calibration_computes_the_last_logits_only_where_no_layer_reads_the_others(monkeypatch):
    from qcompiler.calibration import calibrate as calibration

    kwargs = []
    call = calibration.capture.call
    monkeypatch.setattr(calibration.capture, "call", lambda model, batch: (kwargs.append(dict(batch.kwargs)),
                                                                            call(model, batch))[1])
    model = tiny_llama()
    fast = qcompiler.calibrate(model, token_batches(), progress=False)  # the recipe keeps lm_head in float
    assert kwargs and all(k.get("logits_to_keep") == 1 for k in kwargs)
    kwargs.clear()
    torch._dynamo.reset()
    monkeypatch.setattr(calibration, "_last_logits_only", lambda model, recipe, batches: batches)
    full = qcompiler.calibrate(model, token_batches(), progress=False)
    assert kwargs and not any("logits_to_keep" in k for k in kwargs)
    assert fast.activations.keys() == full.activations.keys()
    for name, ranges in fast.activations.items():
        assert torch.equal(ranges.hist_counts, full.activations[name].hist_counts), name
        assert torch.equal(ranges.channel_max, full.activations[name].channel_max), name

    monkeypatch.undo()
    kwargs.clear()
    torch._dynamo.reset()
    monkeypatch.setattr(calibration.capture, "call", lambda model, batch: (kwargs.append(dict(batch.kwargs)),
                                                                            call(model, batch))[1])
    head_too = qcompiler.calibrate(model, token_batches(), qcompiler.Recipe(skip=("*embed*",)), progress=False)
    assert not any("logits_to_keep" in k for k in kwargs)  # lm_head is quantized: its input is observed whole
    assert head_too.activations["lm_head"].channel_max.shape == (64,) and float(head_too.info["tokens"]) == 48
