"""Fold ``AWQ(foldable=True)``'s input scales into the model's own weights (before ``insert_qdq``).

``sequential`` gave the layers of one group the same ``s`` (see there). Here, on the canonical graph with its
plan, each group whose consumers all carry that one ``s`` loses the run-time ``x / s`` of its consumers:

- ``norm``: the norm's weight (and bias) is divided by ``s`` (a new buffer that names the parameter it
  replaces, so export writes it under the parameter's name);
- ``linear`` (``act(gate) * up`` into down_proj): the producer's rows are divided by ``s``: the row scales of
  its rounded weight (``s`` is a power of two there, so exactly), and its float weight and bias;
- ``attention`` (o_proj): the value projection's output also goes into the KV cache the model returns, so
  the divide stays in the graph; the consumer is marked with where export can fold it
  (``meta["qcompiler.value_fold"]``, read by ``insert_qdq`` onto the ``1 / s`` buffer).

The folded consumers' float weights become ``W * s`` (columns), as SmoothQuant leaves them, so the graph's
float weights stay what each layer computes with in float (``compare`` and autotune put them back).
``rounded`` (the recipe's ``CalibrationStats.weights``, a copy the caller owns) is updated to match: the
folded consumers' entries lose their ``input_scale``, the producers' entries get their divided row scales,
and each changed entry the checksum of its new float weight.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.fx as fx

from qcompiler.core.ir import LINEAR, VALUE_FOLD, PassResult, linear_weight, plan_of, weight_checksum
from qcompiler.passes.graph_utils import (
    bias_of,
    constant_value,
    replace_arg_with_tensor,
    replace_linear_weight,
    tensor_digest,
)
from qcompiler.passes.smoothquant import Group, divide_norm, find_groups


def _shared_scale(group: Group, rounded: dict) -> torch.Tensor | None:
    """The one ``s`` every consumer of ``group`` is rounded with, else None."""
    scales = []
    for consumer in group.consumers:
        entry = rounded.get(consumer.meta[LINEAR].module)
        if entry is None or entry.input_scale is None:
            return None
        scales.append(entry.input_scale)
    return scales[0] if all(torch.equal(s, scales[0]) for s in scales[1:]) else None


def _rescale(gm: fx.GraphModule, node: fx.Node, rounded: dict, cols: torch.Tensor | None = None,
             rows: torch.Tensor | None = None) -> bool:
    """Multiply the linear ``node``'s float weight's columns by ``cols`` (its input was divided by them: the
    rounded weight is of ``W * cols`` already, so its ``input_scale`` goes) and divide its rows (and bias) by
    ``rows`` (the rounded weight's row scales too). The graph's float weight stays the one the layer computes
    with in float (what ``compare`` and autotune put back). False (nothing changed) when a rounded layer's
    rows can not take the scales."""
    module = node.meta[LINEAR].module
    entry = rounded.get(module)
    plan = plan_of(node)
    if rows is not None and entry is None and plan is not None and plan.quantized:
        return False  # quantized but not rounded with AWQ: its integers can not take the scales
    weight, _, _ = linear_weight(gm, node.args[1])
    new = weight.detach()
    step = ("awq_fold",)
    if cols is not None:
        new = new * cols.to(new.dtype)[None, :]
        step += ("cols", tensor_digest(cols))
    if rows is not None:
        new = new / rows.to(new.dtype)[:, None]
        step += ("rows", tensor_digest(rows))
    if entry is not None:
        qw = entry.weight
        if rows is not None:
            if qw.scale.shape[0] != rows.numel():
                return False
            inv = (1.0 / rows).to(qw.scale.dtype).reshape(-1, *([1] * (qw.scale.dim() - 1)))
            qw = replace(qw, scale=qw.scale * inv)
        rounded[module] = replace(entry, weight=qw, input_scale=None if cols is not None else entry.input_scale,
                                  checksum=weight_checksum(new))
    replace_linear_weight(gm, node, new, step)
    bias = bias_of(node)
    if rows is not None and isinstance(bias, fx.Node):
        b = constant_value(gm, bias)
        replace_arg_with_tensor(gm, node, 2, b.detach() / rows.to(b.dtype), f"{module}_awq_b")
    return True


def fold_awq_scales(gm: fx.GraphModule, rounded: dict) -> PassResult:
    """Fold the shared AWQ scales of ``rounded`` (updated in place) into norms and producers' rows."""
    groups, _ = find_groups(gm, ("norm", "linear", "attention"))
    details, folded, marked = [], 0, 0
    for group in groups:
        s = _shared_scale(group, rounded)
        if s is None:
            continue
        if group.kind == "attention":
            for consumer in group.consumers:
                consumer.meta[VALUE_FOLD] = group.fold
            marked += 1
            continue
        if group.kind == "norm":
            divide_norm(gm, group, s, f"{group.name}_awq_norm")
        elif not _rescale(gm, group.producer, rounded, rows=s):
            details.append(f"{group.name}: AWQ scales not folded (the producer's weight can not take them)")
            continue
        for consumer in group.consumers:
            _rescale(gm, consumer, rounded, cols=s)
        details.append(f"{group.name}: AWQ 1/s folded into the {group.kind} producer")
        folded += 1
    if folded:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, modified=folded > 0, counts={"folded": folded, "marked": marked}, details=tuple(details))
