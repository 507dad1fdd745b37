"""Lower quantized embedding tables (``passes/quantize_embeddings.py``'s QDQ form) to a row gather.

``embedding(ids, dequantize(E_q, scale, zero))`` dequantizes the whole table on every call; the lowering
stores the table once in its compact form and dequantizes only the rows a batch reads, with plain aten
ops that Inductor fuses into one loop (no custom op, no Python at run time):

- integers: 2..4 bits two per byte (``kernels/reference.pack_int4``, symmetric values stored as ``q + 8``),
  5..8 bits one byte each;
- per row or per group of columns: an fp16 scale, and for asymmetric tables an fp16 offset
  ``-zero * scale`` (both exact: the pass rounded them to fp16 before choosing the integers);
- a row: ``code * scale + offset`` in float32, cast to the table's dtype.

The stored bytes (integers, scales, offsets) are the table's ``weight_bytes`` in the report, which the
whole-model bit counts (``qcompiler autotune``, ``qcompiler report``) read.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from qcompiler.core.ir import DECISION, QEMBEDDING, TENSOR_INFO, QEmbeddingSpec, TensorInfo, tensor_info
from qcompiler.lowering.kernels import reference
from qcompiler.lowering.key import register

KERNEL = "row gather + dequantize (aten ops fused by Inductor)"
_DEQUANTIZE = torch.ops.qcompiler.dequantize.default
_EMBED = torch.ops.aten.embedding.default


def stored_tables(gm: fx.GraphModule, spec: QEmbeddingSpec) -> dict[str, torch.Tensor]:
    """The compact form: ``codes`` (packed or one byte each), ``scale`` and, asymmetric, ``offset`` [rows, groups]."""
    q = gm.get_buffer(spec.w_q)
    rows, dim = q.shape
    scale = gm.get_buffer(spec.w_scale).reshape(rows, dim // spec.group_size).to(torch.float32)
    out = {"scale": scale.to(torch.float16)}
    if spec.weight_symmetric:
        codes = q.to(torch.int16) + (8 if spec.weight_bits <= 4 else 0)
    else:
        codes = q.to(torch.int16)
        zero = gm.get_buffer(spec.w_zero_point).reshape(rows, dim // spec.group_size).to(torch.float32)
        out["offset"] = (-zero * scale).to(torch.float16)
    if spec.weight_bits <= 4:
        out["codes"] = reference.pack_int4(codes)
    else:
        out["codes"] = codes.to(torch.int8 if spec.weight_symmetric else torch.uint8)
    return out


def dequantized_rows(ids, codes, scale, offset, *, bits: int, symmetric: bool, group: int, dim: int, dtype):
    """The rows ``ids`` of the table from its compact form (traced into the graph, or called directly)."""
    rows = torch.nn.functional.embedding(ids, codes)
    if bits <= 4:
        values = torch.stack([rows & 0xF, rows >> 4], dim=-1).flatten(-2).to(torch.float32)
        if symmetric:
            values = values - 8.0
    else:
        values = rows.to(torch.float32)
    values = values.unflatten(-1, (dim // group, group))
    out = values * torch.nn.functional.embedding(ids, scale).to(torch.float32).unsqueeze(-1)
    if offset is not None:
        out = out + torch.nn.functional.embedding(ids, offset).to(torch.float32).unsqueeze(-1)
    return out.flatten(-2).to(dtype)


def _lower_one(gm: fx.GraphModule, node: fx.Node, spec: QEmbeddingSpec):
    table_dq = node.args[1]
    if not (isinstance(table_dq, fx.Node) and table_dq.op == "call_function" and table_dq.target is _DEQUANTIZE
            and table_dq.args[0].op == "get_attr" and table_dq.args[0].target == spec.w_q):
        return "the table is not dequantize(E_q) of its own buffer", None
    q = gm.get_buffer(spec.w_q)
    if spec.weight_bits <= 4 and q.shape[1] % 2:
        return f"width {q.shape[1]} is odd: two 4-bit values are packed per byte", None
    dtype = table_dq.args[-1]
    stored = stored_tables(gm, spec)
    base = spec.w_q.removesuffix("_w_q")
    names = {k: register(gm, f"{base}_emb_{k}", v) for k, v in stored.items()}
    graph = gm.graph
    tracer = fx.proxy.GraphAppendingTracer(graph)
    with graph.inserting_before(node):
        proxies = {k: fx.Proxy(graph.get_attr(n), tracer) for k, n in names.items()}
        out = dequantized_rows(fx.Proxy(node.args[0], tracer), proxies["codes"], proxies["scale"],
                               proxies.get("offset"), bits=spec.weight_bits, symmetric=spec.weight_symmetric,
                               group=spec.group_size, dim=q.shape[1], dtype=dtype).node
    info = tensor_info(node)
    if info is not None:
        out.meta[TENSOR_INFO] = TensorInfo(info.ndim, info.dtype)
    decision = node.meta.get(DECISION)
    if decision is not None:
        nbytes = sum(t.numel() * t.element_size() for t in stored.values())
        decision = dataclasses.replace(decision, weight_bytes=nbytes, bits_per_weight=8.0 * nbytes / q.numel())
        out.meta[DECISION] = decision
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    for n in (table_dq, *[a for a in table_dq.args if isinstance(a, fx.Node)]):
        if not n.users and not n._erased:
            graph.erase_node(n)
    return "", decision


def lower_embeddings(gm: fx.GraphModule) -> list[tuple[str, str, str, object]]:
    """Details per quantized table: ``(module, kernel, why not lowered or "", decision with the stored bytes)``.
    A table whose QDQ form is not the expected one keeps it (reported, not hidden)."""
    details, dropped = [], set()
    for node in list(gm.graph.nodes):
        spec = node.meta.get(QEMBEDDING)
        if spec is None or node.op != "call_function":
            continue
        why, decision = _lower_one(gm, node, spec)
        if why:
            details.append((spec.module, "reference quantize/dequantize ops", why, None))
        else:
            details.append((spec.module, KERNEL, "", decision))
            dropped.update(n for n in (spec.w_q, spec.w_scale, spec.w_zero_point) if n)
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in dropped - used:
        gm._buffers.pop(name, None)
    return details

