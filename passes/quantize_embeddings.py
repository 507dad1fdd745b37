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
stays float and its decision says why. Each table gets a :class:`~qcompiler.core.ir.LayerDecision` (the
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


def quantize_embeddings(gm: fx.GraphModule, scheme: WeightScheme) -> PassResult:
    """Every embedding lookup on a parameter reads its table through quantize/dequantize (see the module
    docstring); details: one :class:`LayerDecision` per table."""
    decisions = []
    for node, param in embedding_lookups(gm):
        table = constant_value(gm, node.args[1])
        module = module_of(param)
        float_bytes = table.numel() * table.element_size()
        fitted = fitted_scheme(scheme, table.shape[1])
        why = why_not(node, table, fitted)
        if why is not None:
            decision = LayerDecision(module, False, param, fitted.describe(), reason=why,
                                     bits_per_weight=8.0 * table.element_size(), weight_bytes=float_bytes,
                                     float_weight_bytes=float_bytes)
        else:
            qw = round_to_nearest(table.detach(), fitted)
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
                                     bits_per_weight=qw.bits_per_weight, weight_bytes=qw.nbytes,
                                     float_weight_bytes=float_bytes)
        node.meta[DECISION] = decision
        decisions.append(decision)
    return decisions_result(gm, decisions)
