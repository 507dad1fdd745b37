"""Quantized weights computed once per parameter and reused across recompiles.

Dynamo recompiles a model for new shapes; the weights do not change, so neither do their quantized
forms. Entries are keyed by the parameter's identity, the scheme, and the parameter's version counter
(an in-place update of the weight invalidates the entry); they die with the parameter. Inference
tensors (a model built or loaded under ``torch.inference_mode()``) have no version counter: a
checksum of their values stands in for it.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from typing import Any

import torch


def _version(param: torch.Tensor):
    if param.is_inference():
        values = param.detach().double().flatten()
        # position-weighted, so that swapping or permuting values changes it too
        ramp = torch.linspace(1.0, 2.0, values.numel(), dtype=torch.float64)
        return ("checksum", float(values @ ramp), float(values.abs().sum()))
    return param._version


class WeightCache:
    def __init__(self) -> None:
        self._entries: dict[tuple[int, Hashable], tuple[weakref.ref, Hashable, Any]] = {}
        self.hits = 0
        self.misses = 0

    def get(self, param: torch.Tensor, key: Hashable, compute: Callable[[], Any]) -> Any:
        entry_key = (id(param), key)
        entry = self._entries.get(entry_key)
        if entry is not None:
            ref, version, value = entry
            if ref() is param and version == _version(param):
                self.hits += 1
                return value
        self.misses += 1
        value = compute()
        ident = id(param)
        self._entries[entry_key] = (weakref.ref(param, lambda _: self._drop(ident)), _version(param), value)
        return value

    def _drop(self, ident: int) -> None:
        for k in [k for k in self._entries if k[0] == ident]:
            del self._entries[k]

    def __len__(self) -> int:
        return len(self._entries)


# One cache for the process: the backend is a plain function that Dynamo calls per graph.
WEIGHTS = WeightCache()
