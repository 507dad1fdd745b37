"""Small graph edits and walks the passes share: new constant buffers, derived weights, ancestors."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch
import torch.fx as fx

from qcompiler.core.ir import (
    CHANNELS,
    DERIVED,
    LINEAR,
    PARAM_META,
    REPLACES,
    TENSOR_INFO,
    ChannelStats,
    DerivedWeight,
    PassResult,
    fresh_name,
    linear_weight,
    tensor_info,
)


def tensor_digest(*tensors: torch.Tensor) -> str:
    """A short SHA-1 of the tensors' bytes: the part of a derived weight's cache key naming its factors."""
    digest = hashlib.sha1()
    for t in tensors:
        digest.update(t.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def ancestors(nodes: Iterable[fx.Node], limit: int | None = None) -> set[fx.Node]:
    """Every node the values of ``nodes`` depend on (not ``nodes`` themselves, unless in a cycle of
    dependence); with ``limit``, the walk stops once that many are found (a bounded, partial answer)."""
    seen: set[fx.Node] = set()
    frontier = list(nodes)
    while frontier and (limit is None or len(seen) < limit):
        current = frontier.pop()
        for parent in current.all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                frontier.append(parent)
    return seen


def add_buffer(gm: fx.GraphModule, stem: str, value: torch.Tensor, before: fx.Node) -> fx.Node:
    """Register ``value`` under a fresh name built from ``stem`` and read it with ``get_attr`` before ``before``."""
    name = fresh_name(gm, stem)
    gm.register_buffer(name, value)
    with gm.graph.inserting_before(before):
        return gm.graph.get_attr(name)


def replace_linear_weight(gm: fx.GraphModule, linear: fx.Node, new_weight: torch.Tensor, step: tuple) -> None:
    """Give a canonical linear a transformed weight; ``step`` (hashable) extends its derivation key."""
    _, owner, key = linear_weight(gm, linear.args[1])
    site = linear.meta[LINEAR]
    node = add_buffer(gm, f"{site.module}_w", new_weight.contiguous(), linear)
    node.meta[DERIVED] = DerivedWeight(owner, key + (step,), site.weight_param)
    old = linear.args[1]
    linear.update_arg(1, node)
    erase_if_unused(gm, old)


def replace_arg_with_tensor(gm: fx.GraphModule, user: fx.Node, index: int, value: torch.Tensor, stem: str) -> None:
    """Replace positional argument ``index`` of ``user`` (a parameter or buffer) by a new constant."""
    old = user.args[index]
    new = add_buffer(gm, stem, value.contiguous(), user)
    if isinstance(old, fx.Node) and old.op == "placeholder" and PARAM_META in old.meta:
        new.meta[REPLACES] = old.meta[PARAM_META].name  # export writes it under the parameter's name
    elif isinstance(old, fx.Node) and REPLACES in old.meta:
        new.meta[REPLACES] = old.meta[REPLACES]
    user.update_arg(index, new)
    erase_if_unused(gm, old)


def erase_if_unused(gm: fx.GraphModule, node) -> None:
    """Drop an intermediate node (a transpose, a replaced get_attr) nobody uses; placeholders stay."""
    while isinstance(node, fx.Node) and not node.users and node.op in ("call_function", "call_method", "get_attr"):
        parent = node.args[0] if node.op != "get_attr" and node.args else None
        gm.graph.erase_node(node)
        node = parent


def constant_value(gm: fx.GraphModule, node) -> torch.Tensor | None:
    """The tensor a parameter placeholder or a buffer ``get_attr`` holds, else None."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "placeholder" and PARAM_META in node.meta:
        return node.meta[PARAM_META].tensor
    if node.op == "get_attr":
        return getattr(gm, node.target)
    return None


def bias_of(linear: fx.Node):
    return linear.args[2] if len(linear.args) > 2 else None


def scale_channels(linear: fx.Node, divide_by: torch.Tensor) -> None:
    """After a transform divided the input's channels by ``divide_by``, update the linear's stats."""
    stats = linear.meta.get(CHANNELS)
    if stats is None:
        return
    s = divide_by.to(stats.channel_min.dtype)
    samples = None if stats.samples is None else stats.samples / divide_by.to(stats.samples.dtype)
    linear.meta[CHANNELS] = ChannelStats(stats.channel_min / s, stats.channel_max / s, samples)


def same_tensor_info(new: fx.Node, like: fx.Node) -> fx.Node:
    """Record on ``new`` the rank and dtype of ``like`` (for nodes that keep both, e.g. a column gather)."""
    info = tensor_info(like)
    if info is not None:
        new.meta[TENSOR_INFO] = info
    return new


def decisions_result(gm: fx.GraphModule, decisions: list) -> PassResult:
    """The result of a pass that quantized some of its sites, one ``LayerDecision`` each (the graph linted
    and recompiled when it changed)."""
    quantized = sum(1 for d in decisions if d.quantized)
    if quantized:
        gm.graph.lint()
        gm.recompile()
    counts = {"quantized": quantized, "float": len(decisions) - quantized}
    return PassResult(gm, modified=quantized > 0, counts=counts, details=tuple(decisions))
