"""A small autotuner for the Triton kernels: configs keyed on (M bucket, N, K).

On a GPU, the first call for a key times every config that fits (``bench``, e.g.
``triton.testing.do_bench``) and keeps the fastest. Without one (the CPU interpreter, or a caller that
wants determinism) a heuristic picks by size: the smallest tile that covers M, so decode-sized calls
get the skinny config. Results never depend on the choice: the tests run every config.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass


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
        if "SPLIT_K" in meta:
            meta.pop("SPLIT_K")
        return meta


def m_bucket(m: int) -> int:
    """Calls with M in the same power-of-two bucket share a tuning result."""
    return 1 << max(0, (m - 1).bit_length())


_cache: dict[tuple, Config] = {}


def pick_config(configs: list[Config], m: int, n: int, k: int,
                bench: Callable[[Config], float] | None = None, name: str = "") -> Config:
    key = (name, id(configs), m_bucket(m), n, k)
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
