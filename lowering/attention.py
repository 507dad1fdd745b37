"""Decode-step attention over the filled part of a static KV cache: ``sdpa(q, k, v, bool_mask)`` with one
query position -> ``qcompiler::decode_attention`` (``kernels/cpu_attention.cpp``).

A decode step on a preallocated cache of ``L`` positions attends to the ``d + 1`` filled ones; PyTorch's
attention reads all ``L`` and discards the masked ones (at depth 128 of a 514-position cache, about 100 us
of SmolLM2's 10 ms step per layer, most of it on empty positions). The kernel stops at the mask's last
allowed position, so it computes the same softmax over the same positions (float32 sums in another order).

Rewritten only where that is certain from the graph: a float32 CPU attention whose query has exactly one
position (a fixed shape), a boolean mask or none, no dropout, not ``is_causal`` (with one query that would
mean "position 0 only"), and key/value heads that the query heads divide (grouped-query attention when
``enable_gqa``, else equal). Everything else, prompts included, keeps PyTorch's attention.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.nn.functional as F

from qcompiler.core.ir import PassResult
from qcompiler.lowering.kernels import native

_SDPA = (torch._C._nn.scaled_dot_product_attention, F.scaled_dot_product_attention)
_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


def _example(node) -> torch.Tensor | None:
    value = node.meta.get("example_value") if isinstance(node, fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _bound(node: fx.Node) -> dict | None:
    """The attention call's arguments by name (None if it has ones this lowering does not know)."""
    if len(node.args) > len(_PARAMS) or any(k not in _PARAMS for k in node.kwargs):
        return None
    bound = {**_DEFAULTS, **dict(zip(_PARAMS, node.args)), **node.kwargs}
    return bound if all(p in bound for p in _PARAMS[:3]) else None


def decode_attention_args(node: fx.Node) -> tuple | None:
    """``(q, k, v, mask, scale)`` when ``node`` is an attention call the kernel computes exactly, else None."""
    if node.op != "call_function" or node.target not in _SDPA:
        return None
    a = _bound(node)
    if a is None or a["dropout_p"] != 0.0 or a["is_causal"] is not False or isinstance(a["scale"], fx.Node):
        return None
    q, k, v, mask = (_example(a[name]) for name in ("query", "key", "value", "attn_mask"))
    if q is None or k is None or v is None or not all(isinstance(d, int) for t in (q, k, v) for d in t.shape):
        return None
    if any(t.dtype != torch.float32 or t.device.type != "cpu" or t.dim() != 4 for t in (q, k, v)):
        return None
    (b, h, length, d), (kb, kv, _, kd) = q.shape, k.shape
    if length != 1 or tuple(k.shape) != tuple(v.shape) or kb != b or kd != d or kv < 1 or h % kv:
        return None
    if kv != h and a["enable_gqa"] is not True:
        return None
    if a["attn_mask"] is not None:
        if mask is None or mask.dtype != torch.bool or mask.dim() != 4 or not all(isinstance(s, int) for s in mask.shape):
            return None
        target = (b, h, 1, k.shape[2])
        try:
            fits = tuple(torch.broadcast_shapes(tuple(mask.shape), target)) == target
        except RuntimeError:
            fits = False
        if not fits:
            return None
    scale = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(d)
    return a["query"], a["key"], a["value"], a["attn_mask"], float(scale)


def decode_attention(gm: fx.GraphModule) -> PassResult:
    """Rewrite every one-query attention call that :func:`decode_attention_args` accepts (CPU, when the C++
    kernels are built; where they are not, nothing changes and the count says 0)."""
    if native.unavailable_reason() is not None:
        return PassResult(gm, modified=False, counts={"decode_attention": 0})
    rewritten = 0
    for node in list(gm.graph.nodes):
        args = decode_attention_args(node)
        if args is None:
            continue
        with gm.graph.inserting_after(node):
            new = gm.graph.call_function(torch.ops.qcompiler.decode_attention.default, args)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        rewritten += 1
    if rewritten:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, modified=rewritten > 0, counts={"decode_attention": rewritten})
