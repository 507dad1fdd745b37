"""Bits of a whole quantized model, counted one way everywhere (``qcompiler autotune``, ``qcompiler report``,
``qcompiler eval``): every floating-point parameter once at its own bits, except that a quantized linear's
weight or embedding table counts at the bytes the backend stores for it (``LayerDecision.weight_bytes``:
integers, scales, zero points at the kernel's widths); a parameter several modules hold (an LM head tied to
the token embedding) keeps its float bits unless every one of them is quantized, and each quantized one
adds its own copy, except a table that reads its tied LM head's quantized weight (``LayerDecision.shared_with``):
that tensor counts once, on the head. The denominator of bits per weight is every floating-point parameter element."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def model_bits(model: torch.nn.Module, decisions: Iterable) -> int:
    """Bits of ``model`` as the backend stores it with ``decisions`` (a compile report's ``layers``; the
    same module decided in several graphs counts once)."""
    quantized = {}
    for d in decisions:
        if d.quantized:
            quantized.setdefault(d.module, d)
    holders: dict[int, list[tuple[str, str]]] = {}  # (module, attribute) places holding each parameter
    for name, module in model.named_modules(remove_duplicate=False):
        for attr, p in module.named_parameters(recurse=False):
            holders.setdefault(id(p), []).append((name, attr))
    bits = 0
    for p in model.parameters():
        stored_quantized = all(attr == "weight" and name in quantized for name, attr in holders.get(id(p), [("", "")]))
        if p.is_floating_point() and not stored_quantized:
            bits += p.numel() * p.element_size() * 8
    return bits + sum(8 * d.weight_bytes for d in quantized.values() if not d.shared_with)


def model_weights(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.is_floating_point())


def model_bits_per_weight(model: torch.nn.Module, decisions: Iterable) -> float:
    """:func:`model_bits` over every floating-point parameter element."""
    return model_bits(model, decisions) / model_weights(model)
