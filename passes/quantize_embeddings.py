"""Quantize the embedding tables (``Recipe(embedding=WeightScheme(...))``): weight-only, in QDQ form.

Every ``embedding(ids, E)`` whose table ``E [rows, dim]`` is a parameter (or a buffer a transform made from
one, such as the rotated embedding) becomes::

    E_dq = qcompiler.dequantize(E_q, E_scale, E_zero_point, block, dtype)     # E_q, E_scale: buffers
    out  = embedding(ids, E_dq)

with one scale (and float zero point, asymmetric) per row, or per ``group_size`` columns of a row. The
scales (and the offsets ``-zero * scale``) are rounded to fp16 before the integers are chosen
(``WeightScheme.fp16_scales``), so the lowering (``qcompiler/lowering/embedding.py``) stores them in fp16
and gathers and dequantizes only the rows a batch reads, exactly. A table the scheme does not fit (a group
that does not divide its width, a ``max_norm`` lookup that renormalizes rows in place, a non-float table)
stays float and its decision says why.

A table that a quantized linear layer also reads as its weight, untransformed (an LM head tied to the token
embedding), with the same bits, symmetry and group, reads that layer's quantized weight instead of a copy
of its own (its decision's ``shared_with`` names the layer): one quantized tensor, rounded as the layer's
recipe rounds it (nearest, HQQ; the pipeline does not share GPTQ/AWQ-rounded integers, fitted to the head's
inputs rather than to the lookups), stored once (the lowering gathers the rows from the layer's kernel format
where it can; ``qcompiler/lowering/embedding.py``). Each table gets a :class:`~qcompiler.core.ir.LayerDecision` (the
report, ``qcompiler explain`` and the whole-model bit counts read it) and a
:class:`~qcompiler.core.ir.QEmbeddingSpec` on the lookup node.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.fx as fx

from qcompiler.config import WeightScheme
from qcompiler.core.ir import (
    DECISION,
    FLOAT_WEIGHT,
    PARAM_META,
    QEMBEDDING,
    QLINEAR,
    REPLACES,
    LayerDecision,
    PassResult,
    QEmbeddingSpec,
    fresh_name,
)
from qcompiler.passes.graph_utils import constant_value, decisions_result
from qcompiler.passes.weight_rounding import round_to_nearest

EMBEDDING_OPS = (torch.nn.functional.embedding,)
_QUANTIZABLE = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def table_name(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The parameter name of an embedding lookup's table (``model.embed_tokens.weight``), or None when the
    table is not a parameter or a buffer made from one."""
    table = node.args[1]
    if not isinstance(table, fx.Node):
        return None
    if table.op == "placeholder" and PARAM_META in table.meta:
        return table.meta[PARAM_META].name
    if table.op == "get_attr" and REPLACES in table.meta:
        return table.meta[REPLACES]
    return None


def embedding_lookups(gm: fx.GraphModule) -> list[tuple[fx.Node, str]]:
    """``(lookup node, table parameter name)`` of every embedding lookup on a parameter, graph order."""
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in EMBEDDING_OPS and QEMBEDDING not in node.meta:
            name = table_name(gm, node)
            if name is not None and constant_value(gm, node.args[1]) is not None:
                out.append((node, name))
    return out


def module_of(param: str) -> str:
    return param.removesuffix(".weight")


def fitted_scheme(scheme: WeightScheme, dim: int) -> WeightScheme:
    """The table's scheme: fp16 scales, the group fitted to the row width as for linears."""
    scheme = replace(scheme, fp16_scales=True)
    return scheme.fitted(dim) if scheme.granularity == "per_group" else scheme


def why_not(node: fx.Node, table: torch.Tensor, scheme: WeightScheme) -> str | None:
    if table.dim() != 2:
        return f"the table has {table.dim()} dimensions, not [rows, dim]"
    if table.dtype not in _QUANTIZABLE:
        return f"table dtype {table.dtype} is not a float type"
    if len(node.args) > 3 and node.args[3] is not None or node.kwargs.get("max_norm") is not None:
        return "the lookup renormalizes rows in place (max_norm)"
    if scheme.granularity == "per_group" and table.shape[1] % scheme.group_size:
        return f"its width {table.shape[1]} is not a multiple of group_size {scheme.group_size}"
    if not bool(torch.isfinite(table.detach()).all()):
        return "the table holds inf/NaN values"
    return None


_DEQUANTIZE = torch.ops.qcompiler.dequantize.default


def storage_key(bits: int, symmetric: bool, granularity: str, group_size: int | None, width: int) -> tuple:
    """What a table and a linear layer ``width`` wide must agree on to share one quantized weight: bits,
    symmetry and columns per scale (the whole row per channel; per tensor never shares)."""
    columns = {"per_group": group_size, "per_channel": width}.get(granularity)
    return (bits, symmetric, columns) if columns is not None else ("per_tensor",)


def tied_linear(gm: fx.GraphModule, table_node: fx.Node, table: torch.Tensor, scheme: WeightScheme):
    """The QDQ linear that reads ``table_node`` itself as its float weight with ``scheme``'s bits, symmetry and
    group, its weight dequantized within two steps of the table (so not scaled by AWQ or otherwise moved):
    ``(linear node, its weight's dequantize node)``, or None."""
    width = table.shape[1]
    key = storage_key(scheme.bits, scheme.symmetric, scheme.granularity, scheme.group_size, width)
    for node in gm.graph.nodes:
        spec = node.meta.get(QLINEAR)
        if spec is None or node.meta.get(FLOAT_WEIGHT) is not table_node:
            continue
        if key != storage_key(spec.weight_bits, spec.weight_symmetric, spec.weight_granularity, spec.group_size, width):
            continue
        group = key[2]
        dq = node.args[1]
        if not (isinstance(dq, fx.Node) and dq.target is _DEQUANTIZE and dq.args[0].op == "get_attr"):
            continue
        scale = gm.get_buffer(spec.w_scale).reshape(table.shape[0], -1, 1).float()
        w = _dequantized(gm, spec, dq).reshape(table.shape[0], -1, group).float()
        if bool(((w - table.detach().float().reshape(w.shape)).abs() <= 2 * scale + 1e-6).all()):
            return node, dq
    return None


def _dequantized(gm: fx.GraphModule, spec, dq: fx.Node) -> torch.Tensor:
    zero = gm.get_buffer(spec.w_zero_point) if spec.w_zero_point else None
    return _DEQUANTIZE(gm.get_buffer(spec.w_q), gm.get_buffer(spec.w_scale), zero, *dq.args[3:])


def _share(gm: fx.GraphModule, node: fx.Node, linear: fx.Node, dq: fx.Node, table: torch.Tensor, fitted,
           param: str) -> LayerDecision:
    """Make the lookup ``node`` read ``linear``'s quantized weight; the table's decision."""
    spec = linear.meta[QLINEAR]
    with gm.graph.inserting_before(node):
        args = [gm.graph.get_attr(n.target) if isinstance(n, fx.Node) else n for n in dq.args[:3]]
        table_dq = gm.graph.call_function(_DEQUANTIZE, (*args, *dq.args[3:-1], table.dtype))
    node.meta[FLOAT_WEIGHT] = node.args[1]
    node.update_arg(1, table_dq)
    group = spec.group_size if spec.weight_granularity == "per_group" else table.shape[1]
    module = module_of(param)
    node.meta[QEMBEDDING] = QEmbeddingSpec(module, param, spec.weight_bits, spec.weight_symmetric, group,
                                           spec.w_q, spec.w_scale, spec.w_zero_point)
    nbytes = round_to_nearest(table.detach(), fitted).nbytes  # its own copy's (the search prices the table alone)
    return LayerDecision(module, True, param, f"{fitted.describe()} (embedding)",
                         reason=f"reads {spec.module}'s quantized weight (the same tensor, stored once)",
                         bits_per_weight=8.0 * nbytes / table.numel(), weight_bytes=nbytes,
                         float_weight_bytes=table.numel() * table.element_size(), shared_with=spec.module, table=True)


def quantize_embeddings(gm: fx.GraphModule, scheme: WeightScheme, share: bool = True) -> PassResult:
    """Every embedding lookup on a parameter reads its table through quantize/dequantize (see the module
    docstring); details: one :class:`LayerDecision` per table. ``share=False``: every table gets its own
    copy (the search measures a table alone so)."""
    decisions = []
    for node, param in embedding_lookups(gm):
        table = constant_value(gm, node.args[1])
        module = module_of(param)
        float_bytes = table.numel() * table.element_size()
        fitted = fitted_scheme(scheme, table.shape[1])
        why = why_not(node, table, fitted)
        tied = tied_linear(gm, node.args[1], table, fitted) if why is None and share else None
        if tied is not None:
            decision = _share(gm, node, *tied, table, fitted, param)
        elif why is not None:
            decision = LayerDecision(module, False, param, fitted.describe(), reason=why,
                                     bits_per_weight=8.0 * table.element_size(), weight_bytes=float_bytes,
                                     float_weight_bytes=float_bytes, table=True)
        else:
            qw = round_to_nearest(table.detach(), fitted)
            stored = qw.nbytes
            prefix = fresh_name(gm, module or "embedding", "_w_q")
            names = [prefix + "_w_q", prefix + "_w_scale", None if qw.zero_point is None else prefix + "_w_zero_point"]
            with gm.graph.inserting_before(node):
                args = []
                for name, value in zip(names, (qw.q, qw.scale, qw.zero_point)):
                    if name is not None:
                        gm.register_buffer(name, value)
                    args.append(None if name is None else gm.graph.get_attr(name))
                table_dq = gm.graph.call_function(torch.ops.qcompiler.dequantize.default,
                                                  (*args, list(qw.block_size), table.dtype))
            node.meta[FLOAT_WEIGHT] = node.args[1]  # left in the graph: compare and autotune switch back to it
            node.update_arg(1, table_dq)
            group = table.shape[1] if fitted.granularity == "per_channel" else fitted.group_size
            node.meta[QEMBEDDING] = QEmbeddingSpec(module, param, fitted.bits, fitted.symmetric, group, *names)
            decision = LayerDecision(module, True, param, f"{fitted.describe()} (embedding)",
                                     bits_per_weight=8.0 * stored / qw.q.numel(), weight_bytes=stored,
                                     float_weight_bytes=float_bytes, table=True)
        node.meta[DECISION] = decision
        decisions.append(decision)
    return decisions_result(gm, decisions)
