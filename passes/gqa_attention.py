"""Grouped-query attention without copying the KV cache: ``sdpa(q, repeat_kv(k), repeat_kv(v))`` ->
``sdpa(q, k, v, enable_gqa=True)``.

Models with fewer key/value heads than query heads (Llama-style GQA: SmolLM2 has 9 query and 3 key/value
heads) repeat each key/value head before attention when a mask is given (Hugging Face's ``repeat_kv``:
``k[:, :, None].expand(B, KV, R, S, D).reshape(B, KV * R, S, D)``). In a decode step on a static cache
that copies the whole cache, ``R`` times, for every layer and step: at 512 cached positions about 5 MB
written and read again per SmolLM2 layer, more than the layer's int8 weights. PyTorch's attention takes
the key/value heads as they are with ``enable_gqa=True`` (query head ``h`` reads key/value head
``h // R``, which is what the repeat builds), so the copy is dropped. Found from the graph: an attention
call whose key and value are each a reshape of an expand of a new axis 2 of a ``[B, KV, S, D]`` tensor,
with the same ``R`` and ``KV * R`` query heads; anything else is left as it is.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from qcompiler.core.ir import PassResult

_SDPA = (torch._C._nn.scaled_dot_product_attention, F.scaled_dot_product_attention)
_ALL = slice(None)


def shape_of(node) -> tuple | None:
    value = node.meta.get("example_value") if isinstance(node, fx.Node) else None
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _is_new_axis_2(node: fx.Node) -> bool:
    """``x[:, :, None, :, :]`` or ``x.unsqueeze(2)`` of a 4-D ``x``."""
    if node.op == "call_function" and node.target is operator.getitem:
        index = node.args[1]
        return isinstance(index, tuple) and index == (_ALL, _ALL, None, _ALL, _ALL)
    if (node.op == "call_method" and node.target == "unsqueeze"
            or node.op == "call_function" and node.target is torch.unsqueeze):
        return tuple(node.args[1:]) == (2,) or node.kwargs.get("dim") == 2
    return False


def repeated_from(node) -> tuple[fx.Node, int] | None:
    """``(x, R)`` when ``node`` is ``x[:, :, None].expand(B, KV, R, S, D).reshape(B, KV * R, S, D)``."""
    if not isinstance(node, fx.Node) or len(node.users) != 1:
        return None
    if not (node.op == "call_method" and node.target in ("reshape", "view")
            or node.op == "call_function" and node.target is torch.reshape):
        return None
    expand = node.args[0]
    if not (isinstance(expand, fx.Node) and expand.op == "call_method" and expand.target == "expand"
            and len(expand.users) == 1):
        return None
    new_axis = expand.args[0]
    if not (isinstance(new_axis, fx.Node) and _is_new_axis_2(new_axis) and len(new_axis.users) == 1):
        return None
    source = new_axis.args[0]
    src, mid, out = shape_of(source), shape_of(expand), shape_of(node)
    if src is None or mid is None or out is None or len(src) != 4 or len(mid) != 5 or len(out) != 4:
        return None
    repeats = mid[2]
    if not isinstance(repeats, int) or not isinstance(src[1], int) or out[1] != src[1] * repeats:
        return None
    if (mid[0], mid[1], mid[3], mid[4]) != src or (out[0], out[2], out[3]) != (src[0], src[2], src[3]):
        return None
    return source, repeats


def gqa_attention(gm: fx.GraphModule) -> PassResult:
    rewritten = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _SDPA or node.kwargs.get("enable_gqa"):
            continue
        if len(node.args) < 3 or "key" in node.kwargs or "value" in node.kwargs:
            continue
        query, key, value = node.args[:3]
        k, v, q_shape = repeated_from(key), repeated_from(value), shape_of(query)
        if k is None or v is None or k[1] != v[1] or k[1] < 2 or q_shape is None or len(q_shape) != 4:
            continue
        if q_shape[1] != shape_of(key)[1]:
            continue
        node.args = (query, k[0], v[0], *node.args[3:])
        node.kwargs = {**node.kwargs, "enable_gqa": True}
        for dead in (key, value):  # the reshape, the expand and the new axis: nothing else reads them
            chain = [dead, dead.args[0], dead.args[0].args[0]]
            for n in chain:
                gm.graph.erase_node(n)
        rewritten += 1
    if rewritten:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, modified=rewritten > 0, counts={"attention_without_kv_copy": rewritten})
