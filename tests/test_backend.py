import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from graphs import tiny_gpt2, tiny_llama

import qcompiler
from qcompiler import pipeline, primitives
from qcompiler.config import BackendOptions, Recipe, WeightScheme
from qcompiler.report import CompileReport
from qcompiler.weight_cache import WEIGHTS


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    qcompiler.clear_reports()


def _compile(model, **options):
    return torch.compile(model, backend="qcompiler", options=options or None)


class TwoLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(32, 48)
        self.fc2 = torch.nn.Linear(48, 16, bias=False)
        self.lm_head = torch.nn.Linear(16, 8)

    def forward(self, x):
        return self.lm_head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def test_qdq_graph_is_per_token_activations_times_per_channel_weights():
    model = TwoLayer().eval()
    x = torch.randn(2, 5, 32)

    def fq_token(t):
        return primitives.fake_quantize(t, primitives.per_token(t.dim()))

    def fq_channel(w):
        return primitives.fake_quantize(w, primitives.per_channel(2, 0))

    h = torch.relu(F.linear(fq_token(x), fq_channel(model.fc1.weight), model.fc1.bias))
    h = torch.relu(F.linear(fq_token(h), fq_channel(model.fc2.weight)))
    expected = model.lm_head(h)
    with torch.inference_mode():
        got = _compile(model, kernels="reference")(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_lowered_kernels_match_the_qdq_reference_on_a_tiny_llama():
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 24))
    with torch.inference_mode():
        reference = _compile(model, kernels="reference")(ids).logits
        torch._dynamo.reset()
        fast = _compile(model)(ids).logits
        float_logits = model(ids).logits
    rep = qcompiler.last_report()
    assert len(rep.quantized) == 14 and [d.module for d in rep.kept_float] == ["lm_head"]
    assert {p.name: p.counts for p in rep.passes}["lower"] == {"lowered": 14, "not_lowered": 0}
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-4)
    assert (fast - float_logits).abs().max() > 0  # it is quantized


def test_gpt2_conv1d_layers_are_quantized_and_lowered():
    model = tiny_gpt2()
    ids = torch.randint(0, 128, (1, 16))
    with torch.inference_mode():
        out = _compile(model)(ids).logits
        ref = model(ids).logits
    rep = qcompiler.last_report()
    assert len(rep.quantized) == 8
    assert all("int8" in d.scheme for d in rep.quantized)
    assert F.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.99


def test_three_sequence_lengths_compile_at_most_twice_and_reuse_quantized_weights():
    model = tiny_llama()
    misses_before = WEIGHTS.misses
    with torch.inference_mode():
        compiled = _compile(model)
        for length in (8, 13, 21):
            compiled(torch.randint(0, 128, (1, length)))
    assert len(qcompiler.reports()) <= 2
    new_misses = WEIGHTS.misses - misses_before
    assert new_misses <= 14  # one quantization per weight, whatever the number of graphs


def test_compiling_never_mutates_the_model_or_its_inputs():
    model = tiny_llama()
    state = copy.deepcopy(model.state_dict())
    ids = torch.randint(0, 128, (1, 10))
    ids_copy = ids.clone()
    with torch.inference_mode():
        _compile(model)(ids)
    assert torch.equal(ids, ids_copy)
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name
    assert all(isinstance(m.weight, torch.nn.Parameter) for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_a_layer_that_cannot_be_quantized_stays_float_and_is_reported():
    recipe = Recipe(name="g5", weight=WeightScheme(bits=8, granularity="per_group", group_size=5))
    model = TwoLayer().eval()
    x = torch.randn(1, 3, 32)
    with torch.inference_mode():
        out = _compile(model, recipe=recipe)(x)
        expected = model(x)
    rep = qcompiler.last_report()
    reasons = {d.module: d.reason for d in rep.kept_float}
    assert "not a multiple of group_size 5" in reasons["fc1"]
    assert "skip pattern 'lm_head'" in reasons["lm_head"]
    torch.testing.assert_close(out, expected)
    assert "fc1" in str(rep) and "float" in str(rep)


def test_unknown_options_and_presets_list_the_valid_ones():
    with pytest.raises(ValueError, match="valid options are: recipe, kernels, stats"):
        BackendOptions.from_user({"recipie": "w8a8-dynamic"})
    with pytest.raises(ValueError, match="the presets are: llm-int8, w4a16-awq, w4a16-gptq, w4a16-hqq, w4a16-rtn, w8a8-dynamic"):
        BackendOptions.from_user({"recipe": "w4a4-magic"})
    with pytest.raises(Exception, match="valid options are"):
        with torch.inference_mode():
            _compile(TwoLayer(), bogus=1)(torch.randn(1, 32))


def test_gradients_enabled_is_a_clear_error():
    model = TwoLayer()
    with pytest.raises(Exception, match="inference_mode"):
        _compile(model)(torch.randn(1, 32))


def test_a_failing_pass_is_named_with_the_passes_before_it():
    def broken(gm):
        raise RuntimeError("boom")

    steps = [pipeline.Step("canonicalize", lambda gm: pipeline.canonicalize(gm)),
             pipeline.Step("broken", broken, requires=("canonicalize",))]
    gm = torch.fx.symbolic_trace(TwoLayer())
    with pytest.raises(pipeline.PassFailed, match=r"'broken' failed after \['canonicalize'\]: RuntimeError: boom"):
        pipeline.run(gm, steps, CompileReport(0, "x", "fast"))


def test_pass_order_constraints_are_checked():
    with pytest.raises(ValueError, match="must run after"):
        pipeline.check_order([pipeline.Step("lower", lambda gm: None, requires=("insert_qdq",))])


def test_backend_is_found_through_the_entry_point_in_a_fresh_interpreter():
    code = (
        "import sys, torch\n"
        "m = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))\n"
        "assert 'qcompiler' not in sys.modules\n"
        "with torch.inference_mode():\n"
        "    y = torch.compile(m, backend='qcompiler')(torch.randn(3, 16))\n"
        "import qcompiler\n"
        "print(len(qcompiler.last_report().quantized), tuple(y.shape))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("2 (3, 4)")


def test_a_pass_that_crashes_leaves_the_graph_in_float_with_a_warning(monkeypatch):
    def broken(gm):
        raise RuntimeError("deliberate")

    monkeypatch.setattr(pipeline, "canonicalize", broken)
    model = TwoLayer().eval()
    x = torch.randn(2, 32)
    with torch.inference_mode(), pytest.warns(UserWarning, match="runs in float"):
        out = _compile(model)(x)
    torch.testing.assert_close(out, model(x))
    rep = qcompiler.last_report()
    assert "'canonicalize' failed" in rep.error and "deliberate" in rep.error
    assert "kept in float" in rep.summary()
