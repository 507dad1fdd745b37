"""The one timing loop every speed figure comes from, and the machine it ran on.

Speed claims are ratios measured side by side: :func:`time_interleaved` calls each candidate in turn,
repeat after repeat, so drift (frequency, other load) hits all of them alike, and reports medians.
"""

from __future__ import annotations

import functools
import platform
import statistics
import time
from collections.abc import Callable, Mapping

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: Mapping[str, Callable[[], object]], repeats: int, device: torch.device | None = None,
                     budget_s: float | None = None, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each callable, called in turn ``repeats`` times after ``warmup`` rounds (which
    compile and autotune); with ``budget_s``, fewer repeats (at least 5) once that many seconds have passed."""
    device = device or torch.device("cpu")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    start_all = time.perf_counter()
    for i in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
        if budget_s is not None and i >= 4 and time.perf_counter() - start_all > budget_s:
            break
    return {name: statistics.median(t) for name, t in times.items()}


def time_pair(kernel: Callable, baseline: Callable, device: torch.device, repeats: int,
              budget_s: float | None = 5.0) -> tuple[float, float]:
    """Median seconds of ``kernel`` and ``baseline``, alternating calls; fewer repeats if slow."""
    medians = time_interleaved({"kernel": kernel, "baseline": baseline}, repeats, device, budget_s)
    return medians["kernel"], medians["baseline"]


_AMD_FAMILIES = {26: "Zen 5", 23: "Zen/Zen 2"}


def _zen(family: int, model: int) -> str | None:
    if family == 25:
        return "Zen 4" if 0x10 <= model <= 0x1F or 0x60 <= model <= 0x7F or 0xA0 <= model <= 0xAF else "Zen 3"
    return _AMD_FAMILIES.get(family)


def _cpuinfo() -> dict[str, str] | None:
    """The first CPU's ``/proc/cpuinfo`` fields, or None where there is no such file."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return None
    return fields


@functools.cache
def machine_name() -> str:
    """The CPU as ``/proc/cpuinfo`` names it, with its microarchitecture where it can be told and the
    int8 dot-product extensions it has (they decide the int8 kernels), e.g. ``AMD EPYC (Zen 4, AVX512-VNNI)``."""
    fields = _cpuinfo()
    if fields is None:
        return platform.processor() or platform.machine()
    name = fields.get("model name", platform.machine())
    flags = set(fields.get("flags", "").split())
    notes = []
    if fields.get("vendor_id") == "AuthenticAMD":
        arch = _zen(int(fields.get("cpu family", 0)), int(fields.get("model", 0)))
        if arch:
            notes.append(arch)
    elif int(fields.get("cpu family", 0)) == 6 and int(fields.get("model", 0)) in (143, 207):
        notes.append("Sapphire/Emerald Rapids")
    notes += [label for flag, label in (("amx_int8", "AMX-INT8"), ("avx512_vnni", "AVX512-VNNI"),
                                        ("avx_vnni", "AVX-VNNI"), ("avx2", "AVX2")) if flag in flags][:2]
    return f"{name} ({', '.join(notes)})" if notes else name


def cpu_fingerprint() -> str:
    """12 hex digits naming this CPU's vendor, model and instruction-set flags: a binary built for one
    (llama.cpp's ``GGML_NATIVE``) may not run on another (SIGILL), so such builds are kept per fingerprint."""
    import hashlib

    fields = _cpuinfo() or {}
    text = "|".join([fields.get("vendor_id", ""), fields.get("model name", platform.processor()),
                     " ".join(sorted(fields.get("flags", platform.machine()).split()))])
    return hashlib.sha256(text.encode()).hexdigest()[:12]
