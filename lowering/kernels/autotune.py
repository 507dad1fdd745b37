"""A small autotuner for the Triton kernels: configs keyed on (name, M bucket, N, K).

On a GPU (a CUDA tensor, not under the interpreter) a launcher called without a config passes
:func:`gpu_bench`: the first call for a key times every config with ``triton.testing.do_bench`` and
keeps the fastest (a config that does not fit the GPU's shared memory or registers times as
infinite). Elsewhere (the CPU interpreter, where ``do_bench`` needs a driver) a heuristic picks by
size: the smallest tile that covers M, so decode-sized calls get the skinny config. Results never
depend on the choice: the tests run every config of every list on one problem.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch


def interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(frozen=True)
class Config:
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    GROUP_M: int = 8
    num_warps: int = 4
    num_stages: int = 3
    SPLIT_K: int = 1

    def meta(self) -> dict:
        """Keyword arguments for the kernel launch."""
        meta = asdict(self)
        meta.pop("SPLIT_K")  # the launcher's, not the kernel's (it sizes the grid and the partial sums)
        return meta


def m_bucket(m: int) -> int:
    """Calls with M in the same power-of-two bucket share a tuning result."""
    return 1 << max(0, (m - 1).bit_length())


def timer_for(device: torch.device) -> Callable[[Callable[[], object]], float] | None:
    """A function timing a launch (median ms, ``triton.testing.do_bench``) on a CUDA device outside the
    interpreter; None elsewhere, where :func:`pick_config` uses its size heuristic."""
    if device.type != "cuda" or interpreting():
        return None
    from triton.runtime.errors import OutOfResources
    from triton.testing import do_bench

    def time_launch(launch: Callable[[], object]) -> float:
        try:
            return do_bench(launch, warmup=5, rep=20)
        except OutOfResources:  # the config does not fit this GPU
            return float("inf")

    return time_launch


def gpu_bench(device: torch.device, launch: Callable[[Config], object]) -> Callable[[Config], float] | None:
    """The ``bench`` for :func:`pick_config`: times ``launch(config)`` on ``device``, None where nothing is timed."""
    timer = timer_for(device)
    if timer is None:
        return None
    return lambda cfg: timer(lambda: launch(cfg))


# The chosen config per (kernel, config list, M bucket, N, K): a few entries per layer shape, never stale
# (configs are frozen values, and a key holds the list itself, not its id).
_cache: dict[tuple, Config] = {}


def pick_config(configs: list[Config], m: int, n: int, k: int,
                bench: Callable[[Config], float] | None = None, name: str = "") -> Config:
    key = (name, tuple(configs), m_bucket(m), n, k)
    if key in _cache:
        return _cache[key]
    if bench is not None:
        timings = {cfg: bench(cfg) for cfg in configs}
        chosen = min(timings, key=timings.get)
    else:
        covering = [c for c in configs if c.BLOCK_M >= min(m, 128)]
        chosen = min(covering or configs, key=lambda c: (c.BLOCK_M, -c.BLOCK_N))
    _cache[key] = chosen
    return chosen
