"""Calibration: run batches through the model, captured as the backend captures it, with observers.

    stats = qcompiler.calibrate(model, batches, "w8a8-static")
    stats.save("stats/")
    compiled = torch.compile(model, backend="qcompiler", options={"recipe": "w8a8-static", "stats": stats})
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from tqdm.auto import tqdm

import qcompiler
from qcompiler import capture
from qcompiler.config import Recipe, resolve_recipe
from qcompiler.errors import CalibrationError
from qcompiler.observers import DEFAULT_BINS, ActivationObserver
from qcompiler.passes.canonicalize import canonicalize
from qcompiler.passes.insert_observers import insert_observers
from qcompiler.stats import CalibrationStats


def _accepts(model: torch.nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _run(compiled, batch, use_cache_kw: bool) -> int:
    """Run one batch; returns its number of tokens (elements of the first tensor)."""
    if isinstance(batch, torch.Tensor):
        compiled(batch, **({"use_cache": False} if use_cache_kw else {}))
        return batch.numel()
    if isinstance(batch, Mapping):
        kwargs = dict(batch)
        if use_cache_kw:
            kwargs.setdefault("use_cache", False)
        compiled(**kwargs)
        first = next((v for v in batch.values() if isinstance(v, torch.Tensor)), None)
        return 0 if first is None else first.numel()
    if isinstance(batch, (tuple, list)) and all(isinstance(b, torch.Tensor) for b in batch):
        compiled(*batch)
        return batch[0].numel() if batch else 0
    raise CalibrationError(
        f"calibration batch of type {type(batch).__name__} is not supported: give input-id tensors, "
        "dicts of model keyword inputs, or tuples of positional input tensors"
    )


def calibrate(
    model: torch.nn.Module,
    batches: Iterable,
    recipe: str | Recipe | None = None,
    *,
    progress: bool = True,
    bins: int = DEFAULT_BINS,
) -> CalibrationStats:
    """Statistics of every linear layer's input over ``batches`` (layers the recipe skips are left out).

    The model's weights and outputs are not changed. Raises :class:`CalibrationError` on no batches,
    unsupported batch types, a model without linear layers, or inf/NaN in a layer's input (named).
    """
    recipe = resolve_recipe(recipe)
    if isinstance(batches, (torch.Tensor, str, bytes)):
        raise CalibrationError(
            f"batches must be an iterable of batches (e.g. a list of input-id tensors), not a single "
            f"{type(batches).__name__}; wrap it in a list"
        )
    observers: dict[str, ActivationObserver] = {}

    def observer_for(module: str):
        return observers.setdefault(module, ActivationObserver(module, bins)).observe

    def calibration_backend(gm, example_inputs, **_):
        capture.bind_parameters(gm, example_inputs)
        canonicalize(gm)
        insert_observers(gm, observer_for, skip=lambda m: recipe.scheme_for(m) is None)
        return gm.forward

    compiled = torch.compile(model, backend=calibration_backend)
    use_cache_kw = _accepts(model, "use_cache")
    total = len(batches) if hasattr(batches, "__len__") else None
    count, tokens, start = 0, 0, time.perf_counter()
    with torch.inference_mode():
        for batch in tqdm(batches, total=total, desc="calibrating", disable=not progress):
            tokens += _run(compiled, batch, use_cache_kw)
            count += 1
    if count == 0:
        raise CalibrationError("no calibration batches: pass a non-empty list of batches (e.g. 128 x 512 tokens)")
    seen = {m: o for m, o in observers.items() if o.batches > 0}
    if not seen:
        raise CalibrationError(
            "the model has no linear layers to calibrate (none found, or all skipped by the recipe's "
            f"skip list {recipe.skip})"
        )
    info = {
        "batches": count, "tokens": tokens, "recipe": recipe.name, "bins": bins,
        "seconds": round(time.perf_counter() - start, 2), "qcompiler_version": qcompiler.__version__,
    }
    return CalibrationStats({m: o.freeze() for m, o in seen.items()}, info)


def text_batches(tokenizer, path: str | Path, samples: int, seq_len: int, add_bos: bool = False) -> list[torch.Tensor]:
    """``samples`` consecutive, non-overlapping windows of ``seq_len`` tokens from a text file, as [1, T] tensors."""
    text = Path(path).read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    body = seq_len - 1 if add_bos else seq_len
    need = samples * body
    if len(ids) < need:
        raise CalibrationError(
            f"{path} has {len(ids)} tokens, fewer than {samples} samples x {body} tokens; "
            "use fewer --samples, a shorter --seq-len, or a longer text"
        )
    out = []
    for i in range(samples):
        chunk = torch.tensor(ids[i * body : (i + 1) * body], dtype=torch.long)
        if add_bos:
            chunk = torch.cat([torch.tensor([tokenizer.bos_token_id]), chunk])
        out.append(chunk.unsqueeze(0))
    return out
