"""Lower quantized embedding tables (``passes/quantize_embeddings.py``'s QDQ form) to a row gather.

``embedding(ids, dequantize(E_q, scale, zero))`` dequantizes the whole table on every call; the lowering
stores the table once in its compact form and dequantizes only the rows a batch reads, with plain aten
ops that Inductor fuses into one loop (no custom op, no Python at run time):

- integers: 2..4 bits two per byte (``kernels/reference.pack_int4``, symmetric values stored as ``q + 8``),
  5..8 bits one byte each;
- per row or per group of columns: an fp16 scale, and for asymmetric tables an fp16 offset
  ``-zero * scale`` (both exact: the pass rounded them to fp16 before choosing the integers);
- a row: ``code * scale + offset`` in float32, cast to the table's dtype.

These bytes are the table's ``kernel_bytes`` (memory); its ``weight_bytes``, which the whole-model bit counts
read, are the stored form's (``qcompiler.core.storage``: integers packed at their bits).

A table that reads a tied LM head's quantized weight (``LayerDecision.shared_with``, set by the pass) stores
nothing of its own: its rows are gathered from the head's storage, dequantized as the head's kernel holds them:

- ATen's CPU int4 layout (``[N / tile][K][tile / 2]`` bytes, scales and offsets ``[groups, N, 2]`` in bf16):
  :func:`rows_from_int4pack`, with the tile and the nibble order found by reading every row back at lowering
  time (they depend on the build, the CPU and N; a layout it does not read, such as a shorter last tile,
  leaves the table its own copy);
- rows of nibbles with ``[N, groups]`` scales and zeros (the C++ decode GEMV, Triton, reference layouts):
  :func:`rows_from_linear` (``packed``);
- the int8 kernels' integers (they keep the QDQ ``w_q`` beside any prepacked copy) and float32 scales, or a
  head left in QDQ form: :func:`rows_from_linear`.

A layout none of these reads (an int4 tile layout of a CPU the gather does not know) leaves the table its own
copy (float32 scales, the head's), its decision says so, and its ``weight_bytes`` are counted; a shared
table's ``weight_bytes`` are what its own copy would store (the search prices the table alone with them).
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


def stored_tables(gm: fx.GraphModule, spec: QEmbeddingSpec, fp16: bool = True) -> dict[str, torch.Tensor]:
    """The compact form: ``codes`` (packed or one byte each), ``scale`` and, asymmetric, ``offset`` [rows, groups]
    in fp16 (exact for the pass's own tables) or, ``fp16=False`` (a table that read a linear's weight), float32."""
    q = gm.get_buffer(spec.w_q)
    rows, dim = q.shape
    scale = gm.get_buffer(spec.w_scale).reshape(rows, dim // spec.group_size).to(torch.float32)
    width = torch.float16 if fp16 else torch.float32
    out = {"scale": scale.to(width)}
    if spec.weight_symmetric:
        codes = q.to(torch.int16) + (8 if spec.weight_bits <= 4 else 0)
    else:
        codes = q.to(torch.int16)
        zero = gm.get_buffer(spec.w_zero_point).reshape(rows, dim // spec.group_size).to(torch.float32)
        out["offset"] = (-zero * scale).to(width)
    if spec.weight_bits <= 4:
        out["codes"] = reference.pack_int4(codes)
    else:
        out["codes"] = codes.to(torch.int8 if spec.weight_symmetric else torch.uint8)
    return out


def _codes(ids, codes, packed: bool):
    """The rows ``ids`` of integer ``codes`` in float32, unpacked when two 4-bit values share a byte
    (``kernels/reference.pack_int4``: low nibble first)."""
    rows = torch.nn.functional.embedding(ids, codes)
    if packed:
        rows = torch.stack([rows & 0xF, rows >> 4], dim=-1).flatten(-2)
    return rows.to(torch.float32)


def _per_group(ids, values, rows: int | None = None):
    """The rows ``ids`` of a ``[rows, groups]`` tensor of scales, offsets or zeros (``rows``: viewed so first)
    as ``[..., groups, 1]`` float32."""
    values = values if rows is None else values.reshape(rows, -1)
    return torch.nn.functional.embedding(ids, values).to(torch.float32).unsqueeze(-1)


def dequantized_rows(ids, codes, scale, offset, *, bits: int, symmetric: bool, group: int, dim: int, dtype):
    """The rows ``ids`` of the table from its compact form (traced into the graph, or called directly)."""
    values = _codes(ids, codes, bits <= 4)
    if bits <= 4 and symmetric:
        values = values - 8.0
    out = values.unflatten(-1, (dim // group, group)) * _per_group(ids, scale)
    if offset is not None:
        out = out + _per_group(ids, offset)
    return out.flatten(-2).to(dtype)


def rows_from_linear(ids, codes, scale, zero, *, packed: bool, group: int, dim: int, rows: int, dtype):
    """The rows ``ids`` of a linear layer's weight ``(q - zero) * scale`` (``zero`` None: 0) with ``[N, groups]``
    scales and zeros and its integers one per byte (the QDQ form, the int8 kernels) or, ``packed``, two per byte
    in rows (``kernels/reference.pack_int4``: the C++ GEMV, Triton and reference layouts)."""
    values = _codes(ids, codes, packed).unflatten(-1, (dim // group, group))
    if zero is not None:
        values = values - _per_group(ids, zero, rows)
    return (values * _per_group(ids, scale, rows)).flatten(-2).to(dtype)


def rows_from_tiled(ids, tiled, scale, zero, *, group: int, dim: int, dtype):
    """The rows ``ids`` of a linear layer's weight ``(q - zero) * scale`` stored in the tiled int4 layout of the
    C++ decode GEMV (``kernels/reference.pack_int4_tiled``: ``[N / 32, 16 K]`` bytes, scales and zeros
    ``[N / 32, G, 32]``): tile ``ids // 32``, row ``ids % 32`` of it, a gather (nothing else is unpacked)."""
    tile, row = ids // reference.INT4_TILE, ids % reference.INT4_TILE
    pairs = tiled.view(tiled.shape[0], dim // 4, reference.INT4_TILE, 2)[tile, :, row, :]  # [..., K / 4, 2]
    values = torch.stack([pairs & 0xF, pairs >> 4], dim=-2).flatten(-3).to(torch.float32)  # k, k+1, k+2, k+3
    values = values.unflatten(-1, (dim // group, group))
    values = values - zero[tile, :, row].to(torch.float32).unsqueeze(-1)
    return (values * scale[tile, :, row].to(torch.float32).unsqueeze(-1)).flatten(-2).to(dtype)


def int4pack_codes(ids, packed, columns, *, block: int, dim: int, adjacent: bool = False):
    """The 4-bit codes ``[..., dim]`` of rows ``ids`` in ATen's CPU int4 layout with ``block`` rows per tile:
    ``[N / block][dim][block / 2]`` bytes; byte ``j`` of a tile's column holds row ``j`` (low nibble) and row
    ``j + block / 2`` (high nibble) on x86 builds, rows ``2j`` and ``2j + 1`` with ``adjacent`` (other builds).
    ``columns``: ``arange(dim)``."""
    half = block // 2
    tile, row = ids // block, ids % block
    inner, shift = (row // 2, row % 2 * 4) if adjacent else (row % half, row // half * 4)
    index = (tile * (block * dim // 2) + inner).unsqueeze(-1) + columns * half
    return (packed.reshape(-1)[index].to(torch.int32) >> shift.unsqueeze(-1)) & 0xF


def rows_from_int4pack(ids, packed, scale_zeros, columns, *, block: int, group: int, dim: int, dtype,
                       adjacent: bool = False):
    """The rows ``ids`` of a layer in ATen's CPU int4 layout, as its kernel computes them:
    ``(q - 8) * scale + offset`` with its ``[groups, N, 2]`` scales and offsets."""
    codes = int4pack_codes(ids, packed, columns, block=block, dim=dim, adjacent=adjacent).to(torch.float32) - 8.0
    sz = scale_zeros[:, ids].movedim(0, -2).to(torch.float32)  # [..., groups, 2]
    values = codes.unflatten(-1, (dim // group, group)) * sz[..., 0:1] + sz[..., 1:2]
    return values.flatten(-2).to(dtype)


def int4pack_block(codes: torch.Tensor, packed: torch.Tensor, offset: int = 0) -> tuple[int, bool] | None:
    """``(rows per tile, adjacent)`` of ``packed`` (ATen's CPU int4 layout of ``codes [N, K] + offset`` in
    [0, 15]; it depends on the build, the CPU and N) such that :func:`int4pack_codes` reads every row exactly,
    or None (a layout it does not read, e.g. a last tile shorter than the others)."""
    rows, dim = codes.shape
    columns = torch.arange(dim)
    for block in (64, 32, 16, 128):
        for adjacent in (False, True):
            if rows % block or packed.numel() * 2 != rows * dim:
                continue
            if all(torch.equal(int4pack_codes(torch.arange(i, min(i + 2048, rows)), packed, columns, block=block,
                                              dim=dim, adjacent=adjacent), codes[i:i + 2048].to(torch.int32) + offset)
                   for i in range(0, rows, 2048)):
                return block, adjacent
    return None


def _shared_rows(gm, spec: QEmbeddingSpec, ids, entry, dtype, rows: int, dim: int):
    """Trace the rows ``ids`` read from the storage of the linear layer the table shares (``entry``:
    ``(its spec, its Prepared)`` when lowered, None when it kept its QDQ form); None where that storage
    holds no layout the gathers read (a CPU int4 tile layout they do not know)."""
    graph = gm.graph
    tracer = fx.proxy.GraphAppendingTracer(graph)

    def buf(name):
        return fx.Proxy(graph.get_attr(name), tracer)

    ids = fx.Proxy(ids, tracer)
    if entry is None:
        zero = buf(spec.w_zero_point) if spec.w_zero_point else None
        return rows_from_linear(ids, buf(spec.w_q), buf(spec.w_scale), zero, packed=False, group=spec.group_size,
                                dim=dim, rows=rows, dtype=dtype).node
    linear, prepared = entry
    layout, b = prepared.constants.get("layout"), prepared.buffers
    if b.get("w_q") == linear.w_q and linear.w_zero_point is None:  # the int8 kernels keep the integers as they are
        return rows_from_linear(ids, buf(b["w_q"]), buf(b["w_scale"]), None, packed=False, group=spec.group_size,
                                dim=dim, rows=rows, dtype=dtype).node
    if layout in ("gemv", "triton", "reference"):
        return rows_from_linear(ids, buf(b["w_packed"]), buf(b["scale"]), buf(b["zero"]), packed=True,
                                group=prepared.constants["group_size"], dim=dim, rows=rows, dtype=dtype).node
    if layout == "gemv_tiled":
        return rows_from_tiled(ids, buf(b["w_tiled"]), buf(b["scale"]), buf(b["zero"]),
                               group=prepared.constants["group_size"], dim=dim, dtype=dtype).node
    if layout == "cpu":
        layout = int4pack_block(gm.get_buffer(linear.w_q), gm.get_buffer(b["packed"]),
                                offset=8 if linear.weight_symmetric else 0)
        if layout is None:
            return None
        columns = fx.Proxy(graph.call_function(torch.arange, (dim,), {"dtype": torch.int64}), tracer)
        return rows_from_int4pack(ids, buf(b["packed"]), buf(b["scale_zeros"]), columns, block=layout[0],
                                  group=prepared.constants["group_size"], dim=dim, dtype=dtype,
                                  adjacent=layout[1]).node
    return None


def _lower_one(gm: fx.GraphModule, node: fx.Node, spec: QEmbeddingSpec, storage: dict):
    table_dq = node.args[1]
    if not (isinstance(table_dq, fx.Node) and table_dq.op == "call_function" and table_dq.target is _DEQUANTIZE
            and table_dq.args[0].op == "get_attr" and table_dq.args[0].target == spec.w_q):
        return "the table is not dequantize(E_q) of its own buffer", None
    q = gm.get_buffer(spec.w_q)
    rows, dim = q.shape
    dtype = table_dq.args[-1]
    decision = node.meta.get(DECISION)
    out = None
    own_scales = decision is None or not decision.shared_with
    if not own_scales:
        with gm.graph.inserting_before(node):
            out = _shared_rows(gm, spec, node.args[0], storage.get(spec.w_q), dtype, rows, dim)
        if out is None:
            decision = dataclasses.replace(decision, shared_with="", reason=(
                f"{decision.shared_with}'s kernel stores its weight in a layout the row gather does not read: "
                "the table keeps its own copy"))
    if out is None:
        if spec.weight_bits <= 4 and dim % 2:
            return f"width {dim} is odd: two 4-bit values are packed per byte", None
        stored = stored_tables(gm, spec, fp16=own_scales)
        base = spec.w_q.removesuffix("_w_q")
        names = {k: register(gm, f"{base}_emb_{k}", v) for k, v in stored.items()}
        graph = gm.graph
        tracer = fx.proxy.GraphAppendingTracer(graph)
        with graph.inserting_before(node):
            proxies = {k: fx.Proxy(graph.get_attr(n), tracer) for k, n in names.items()}
            out = dequantized_rows(fx.Proxy(node.args[0], tracer), proxies["codes"], proxies["scale"],
                                   proxies.get("offset"), bits=spec.weight_bits, symmetric=spec.weight_symmetric,
                                   group=spec.group_size, dim=dim, dtype=dtype).node
        if decision is not None:
            decision = dataclasses.replace(decision, kernel_bytes=sum(t.numel() * t.element_size() for t in stored.values()))
    info = tensor_info(node)
    if info is not None:
        out.meta[TENSOR_INFO] = TensorInfo(info.ndim, info.dtype)
    if decision is not None:
        out.meta[DECISION] = decision
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)
    for n in (table_dq, *[a for a in table_dq.args if isinstance(a, fx.Node)]):
        if not n.users and not n._erased:
            gm.graph.erase_node(n)
    return "", decision


def lower_embeddings(gm: fx.GraphModule, storage: dict | None = None) -> list[tuple[str, str, str, object]]:
    """Details per quantized table: ``(module, kernel, why not lowered or "", decision with the stored bytes)``.
    A table whose QDQ form is not the expected one keeps it (reported, not hidden). ``storage``: per lowered
    linear's ``w_q`` buffer, ``(its spec, its Prepared)`` (``fuse.lower``), for the tables that share one."""
    details, dropped = [], set()
    for node in list(gm.graph.nodes):
        spec = node.meta.get(QEMBEDDING)
        if spec is None or node.op != "call_function":
            continue
        why, decision = _lower_one(gm, node, spec, storage or {})
        if why:
            details.append((spec.module, "reference quantize/dequantize ops", why, None))
        else:
            details.append((spec.module, KERNEL, "", decision))
            dropped.update(n for n in (spec.w_q, spec.w_scale, spec.w_zero_point) if n)
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in dropped - used:
        gm._buffers.pop(name, None)
    return details

