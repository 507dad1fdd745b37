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
from qcompiler.core.errors import QCompilerError
from qcompiler.core.weight_cache import WEIGHTS
from qcompiler.report import CompileReport


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


@pytest.mark.inductor
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


@pytest.mark.inductor
@pytest.mark.parametrize("recipe", ["w8a8-dynamic", "w8a8-static", "w4a16-rtn"])
def test_the_eager_compiler_runs_the_same_quantized_graph_without_inductor(recipe, monkeypatch):
    """compiler="eager": the same passes, lowering and kernels, run op by op; Inductor is never called."""
    from qcompiler.calibration.calibrate import calibrate

    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 24))
    stats = calibrate(model, [ids], recipe, progress=False) if recipe == "w8a8-static" else None
    got = {}
    for compiler in ("inductor", "eager"):
        for kernels in ("fast", "reference"):
            torch._dynamo.reset()
            qcompiler.clear_reports()
            with torch.inference_mode():
                got[compiler, kernels] = _compile(model, recipe=recipe, stats=stats, kernels=kernels,
                                                  compiler=compiler)(ids).logits
            rep = qcompiler.last_report()
            assert len(rep.quantized) == 14
            lowered = {p.name: p.counts for p in rep.passes}.get("lower", {}).get("lowered", 0)
            assert lowered == (14 if kernels == "fast" else 0)
        if compiler == "inductor":  # from here on Inductor must not be reached
            import torch._inductor.compile_fx as compile_fx

            monkeypatch.setattr(compile_fx, "compile_fx", lambda *a, **k: pytest.fail("Inductor was called"))
    for kernels in ("fast", "reference"):
        torch.testing.assert_close(got["eager", kernels], got["inductor", kernels], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="option 'compiler'.*eager"):
        BackendOptions(compiler="tvm")


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


@pytest.mark.inductor
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
    with pytest.raises(ValueError, match="the presets are: llm-int8, w4a16-awq, w4a16-gptq, w4a16-hqq, w4a16-q4_0-awq, w4a16-q4_0-gptq, w4a16-q4_1-gptq, w4a16-q4_1-hqq, w4a16-rotated-gptq, w4a16-rtn, w4a8-dynamic-rotated-gptq, w8a16-q8_0, w8a8-dynamic"):
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


@pytest.mark.parametrize("recipe", ["w8a8-dynamic", "w8a8-static"])
def test_compiled_linear_on_a_float_input_mutates_neither_the_input_nor_the_model(recipe):
    # fc1 reads the user's float tensor directly: both CPU kernels (FBGEMM up to SMALL_M rows,
    # oneDNN above) and the quantize step in front of them must leave it alone
    from qcompiler.lowering.kernels import cpu

    model = TwoLayer().eval()
    state = copy.deepcopy(model.state_dict())
    stats = None
    if recipe == "w8a8-static":
        stats = qcompiler.calibrate(model, [torch.randn(2, 6, 32) for _ in range(3)], recipe, progress=False)
    # one graph for every row count: the kernel is picked per call (int8_gemm looks at M)
    compiled = torch.compile(model, backend="qcompiler", dynamic=True, options={"recipe": recipe, "stats": stats})
    for rows in (3 * cpu.SMALL_M, cpu.SMALL_M, 3):
        x = torch.randn(1, rows, 32) * 3
        x_copy = x.clone()
        with torch.inference_mode():
            compiled(x)
        assert torch.equal(x, x_copy), rows
    assert len(qcompiler.reports()) == 1
    assert {p.name: p.counts for p in qcompiler.last_report().passes}["lower"]["lowered"] == 2
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name


def test_saturating_cpus_keep_the_recipes_weights_and_fast_equals_reference(monkeypatch):
    # This CPU may accumulate int8 in int32; pretend its kernels saturate int16 pair sums: the weights are
    # packed as FBGEMM's pair-limited part plus the excess in float, and still multiply as the recipe rounded them.
    from qcompiler.lowering.kernels import cpu

    monkeypatch.setattr(cpu, "saturates", lambda: True)
    # integer weights with scale 2**-7 (each row's absmax is 127 steps): quantization is exact
    q = torch.tensor([[127, 127, 10, -20, -100, 60, 5, 3],   # two pairs over 128
                      [127, 1, -3, 4, 0, 0, 2, 2],            # |127| + |1| = 128: at the limit
                      [-127, -2, 50, 50, 1, 1, 1, 1],         # 129
                      [12, -127, 64, 65, 3, 2, 1, 0]])        # two pairs over
    model = torch.nn.Sequential(torch.nn.Linear(8, 4)).eval()
    with torch.no_grad():
        model[0].weight.copy_(q * 2.0**-7)
        model[0].bias.copy_(torch.tensor([0.5, -0.25, 0.0, 1.0]))
    # one-hot rows quantize exactly per token, so output row j is column j of the weight the kernel used, + bias
    x = torch.eye(8).repeat(3, 1)  # 24 rows (oneDNN's regime where it exists: FBGEMM here); the first 8 alone
    with torch.inference_mode():
        ref = _compile(model, kernels="reference")(x)
        torch._dynamo.reset()
        fast = torch.compile(model, backend="qcompiler", dynamic=True)  # one graph for both row counts
        fast_many, fast_few = fast(x), fast(x[: cpu.SMALL_M])
    used = (ref[:8] - model[0].bias).t() * 2.0**7
    torch.testing.assert_close(used, q.float(), rtol=0, atol=1e-4)  # the weights as rounded, pairs over 128 too
    torch.testing.assert_close(fast_many, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(fast_few, ref[: cpu.SMALL_M], rtol=0, atol=1e-5)
    assert "multiplied apart" in cpu.describe()


def test_a_model_built_under_inference_mode_is_quantized_and_weight_edits_requantize():
    # its parameters are inference tensors, which have no version counter for the weight cache
    with torch.inference_mode():
        model = TwoLayer().eval()
        x = torch.randn(2, 5, 32)
        out = _compile(model, kernels="reference")(x)
        rep = qcompiler.last_report()
        assert not rep.error and [d.module for d in rep.quantized] == ["fc1", "fc2"]
        fq = lambda t, block: primitives.fake_quantize(t, block)  # noqa: E731
        h = torch.relu(F.linear(fq(x, primitives.per_token(3)), fq(model.fc1.weight, primitives.per_channel(2)),
                                model.fc1.bias))
        h = torch.relu(F.linear(fq(h, primitives.per_token(3)), fq(model.fc2.weight, primitives.per_channel(2))))
        torch.testing.assert_close(out, model.lm_head(h), rtol=1e-5, atol=1e-6)
        model.fc1.weight.mul_(-1)  # an in-place edit: fc1 must be quantized again, fc2 reused
        hits, misses = WEIGHTS.hits, WEIGHTS.misses
        torch._dynamo.reset()
        _compile(model, kernels="reference")(x)
    assert (WEIGHTS.hits - hits, WEIGHTS.misses - misses) == (1, 1)


def test_a_graph_quantized_for_one_model_never_runs_on_another_or_on_changed_weights():
    # Dynamo's guards check a lifted parameter's shape, not which tensor it is: with equal options the
    # second model would get the first one's graph (its quantized weights beside the second's norms)
    first, second = TwoLayer().eval(), TwoLayer().eval()
    x = torch.randn(2, 5, 32)
    with torch.inference_mode():
        _compile(first)(x)
        with pytest.raises(QCompilerError, match="compiled for another model's fc1.weight"):
            _compile(second)(x)
        # qcompiler.compile gives each model its own backend: each runs its own weights
        for model in (first, second):
            quantized = qcompiler.compile(model, "w8a8-dynamic")(x)
            reference = model(x)
            assert torch.allclose(quantized, reference, atol=0.05 * reference.abs().max().item())
    compiled = qcompiler.compile(first, "w8a8-dynamic")
    with torch.inference_mode():
        compiled(x)
    with torch.no_grad():
        first.fc2.weight.mul_(2.0)  # an in-place update after compiling
    with torch.inference_mode(), pytest.raises(QCompilerError, match="fc2.weight was changed in place"):
        compiled(x)


def test_threads_making_the_first_call_together_all_get_the_quantized_result():
    # issue 14, item 19: each thread may compile the graph itself (README: call once from one thread to
    # compile once); the results are the same either way
    import threading

    model = TwoLayer().eval()
    x = torch.randn(2, 5, 32)
    compiled = _compile(model)
    results, errors = [None] * 4, []

    def first_call(i):
        try:
            with torch.inference_mode():
                results[i] = compiled(x)
        except Exception as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=first_call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    with torch.inference_mode():
        expected = compiled(x)
    assert all(torch.equal(r, expected) for r in results)
    assert all(rep.quantized for rep in qcompiler.reports())


def test_the_process_keeps_the_last_max_reports_and_numbers_graphs_on():
    from qcompiler import report

    for i in range(report.MAX_REPORTS + 5):
        report.record(CompileReport(graph_index=report.next_index(), recipe="r", kernels="fast"))
    kept = qcompiler.reports()
    assert isinstance(kept, list) and len(kept) == report.MAX_REPORTS
    assert [r.graph_index for r in kept] == list(range(5, report.MAX_REPORTS + 5))
    assert qcompiler.last_report() is kept[-1] and report.next_index() == report.MAX_REPORTS + 5
    qcompiler.clear_reports()
    assert qcompiler.reports() == [] and report.next_index() == 0
