import copy
import fcntl
import gc
import os
import sys
import tempfile

# Triton kernels are tested on CPU tensors under the interpreter. triton.jit reads this when a kernel
# module is imported, so it is set before anything imports them.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest
import torch
from hypothesis import HealthCheck, settings

# tests/ is not a package (pytest runs with --import-mode=importlib): make strategies.py importable.
sys.path.insert(0, os.path.dirname(__file__))

# CI runs derandomized so a red build is reproducible; locally hypothesis explores.
settings.register_profile("ci", derandomize=True, max_examples=40, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Tests run in two processes (pytest -n 2, pytest-xdist). A test marked `timing` asserts a speed ratio:
# it takes this lock exclusively, every other test takes it shared, so nothing runs beside a timed test
# (the other process waits between its tests), and a timed test gets the whole machine.
_LOCK = os.path.join(tempfile.gettempdir(), f"qcompiler-pytest-{os.environ.get('PYTEST_XDIST_TESTRUNUID', 'solo')}.lock")


@pytest.fixture(autouse=True)
def _alone_when_timing(request):
    timing = request.node.get_closest_marker("timing") is not None
    with open(_LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX if timing else fcntl.LOCK_SH)
        threads = torch.get_num_threads()
        if timing:
            torch.set_num_threads(os.cpu_count() or threads)
        elif os.environ.get("PYTEST_XDIST_WORKER"):
            torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))  # two workers share the cores
        try:
            yield
        finally:
            torch.set_num_threads(threads)
            fcntl.flock(handle, fcntl.LOCK_UN)


# Inductor compiles C++ for every new kernel it generates: about 1,000 shared libraries for the fast tier, most of
# its time on 2 cores with cold caches (a clean CI machine: 25 to 51 minutes). The quantized graph is the same with
# or without Inductor (the passes, lowering and kernels run before it), so the fast tier runs it op by op (the
# backend's `compiler="eager"`) except in tests marked `inductor` or `timing`: those compile with Inductor as users
# do, at least one for each kind of lowered kernel, the generation path and the saved artifacts' logits. The slow
# tier is not changed: each of its tests chooses.
@pytest.fixture(autouse=True)
def _inductor_only_where_marked(request, monkeypatch):
    node = request.node
    if not any(node.get_closest_marker(m) for m in ("inductor", "slow", "timing")):
        from qcompiler import backend

        monkeypatch.setattr(backend, "compile_with_inductor", lambda module, example_inputs: module.forward)
    yield


# Loading a model is slow where it comes from a GGUF file (SmolLM2-135M: about 5 s since models._one_gguf_parse,
# 17 s before it), and the model tests load it often (the export tests alone, through the CLI, eight times). Each test process loads a model once: every later load_model() of the same arguments gets
# a deep copy of that first, untouched load (the same weights, config and tokenizer; nothing a test does to its copy
# reaches another test). Only the packaged models (the aliases): a path's files may change between loads. What
# loading itself does is tested by the first load of each test process.
@pytest.fixture(autouse=True, scope="session")
def _each_model_loaded_once_per_process():
    from qcompiler.tools import models

    real, loaded = models.load_model, {}

    def load_model(*args, **kwargs):
        if not args or args[0] not in models.ALIASES:
            return real(*args, **kwargs)
        key = repr((args, sorted(kwargs.items())))
        if key not in loaded:
            loaded[key] = real(*args, **kwargs)
        return copy.deepcopy(loaded[key])

    models.load_model = load_model
    yield
    models.load_model = real


# A model test leaves its compiled graphs in Dynamo's caches (quantized copies of every weight, packed kernels,
# Inductor's constants: gigabytes for SmolLM2) until something resets them; a test process of the slow tier ran
# out of memory (16 GB, on a 24 GB machine with the other process at 8 GB) after the in-process export tests.
# After each slow test: Dynamo's caches and the compile reports cleared, the garbage collected.
@pytest.fixture(autouse=True)
def _release_compiled_graphs_after_slow_tests(request):
    yield
    if request.node.get_closest_marker("slow") is not None:
        import qcompiler

        torch._dynamo.reset()
        qcompiler.clear_reports()
        gc.collect()
