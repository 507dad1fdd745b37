import os
import sys

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
