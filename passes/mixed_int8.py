"""LLM.int8()-style decomposition with a calibrated, static outlier set.

For a linear whose input channels ``O`` have calibrated ``max|X_c| > threshold``::

    y = linear(x[..., rest], W[:, rest], b)     # canonical: quantized and lowered to the int8 GEMM
      + linear(x[..., O], W[:, O])             # float, not a quantization site

The column sets are fixed at compile time, so every shape is static and the graph stays whole
(``fullgraph=True``); bitsandbytes finds the columns per call, eagerly. Reads and updates
``meta["qcompiler.channels"]``; charges the float columns to the layer (``qcompiler.float_side_bytes``).
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx

from qcompiler.config import MixedInt8
from qcompiler.core.ir import (
    CHANNELS,
    FLOAT_SIDE_BYTES,
    LINEAR,
    ChannelStats,
    PassResult,
    linear_weight,
    plan_of,
    set_plan,
)
from qcompiler.passes.graph_utils import add_buffer, replace_linear_weight, same_tensor_info, tensor_digest


def _index_select(gm: fx.GraphModule, x: fx.Node, index: torch.Tensor, stem: str, before: fx.Node) -> fx.Node:
    idx = add_buffer(gm, stem, index, before)
    with gm.graph.inserting_before(before):
        return same_tensor_info(gm.graph.call_function(torch.index_select, (x, -1, idx)), x)


def mixed_int8(gm: fx.GraphModule, config: MixedInt8) -> PassResult:
    """Decompose every linear the plan quantizes with activations (schemes from the plan)."""
    graph = gm.graph
    details, decomposed, outlier_columns = [], 0, 0
    for node in list(graph.nodes):
        site = node.meta.get(LINEAR)
        if site is None:
            continue
        plan = plan_of(node)
        scheme = None if plan is None else plan.scheme
        if scheme is None or scheme.activation is None:
            continue
        stats: ChannelStats | None = node.meta.get(CHANNELS)
        if stats is None:
            details.append(f"{site.module}: not decomposed, no calibration statistics")
            continue
        outliers = (stats.absmax > config.threshold).nonzero().flatten()
        if outliers.numel() == 0:
            continue
        if outliers.numel() == site.in_features:
            details.append(f"{site.module}: not decomposed, every column exceeds {config.threshold}")
            continue
        keep = torch.ones(site.in_features, dtype=torch.bool)
        keep[outliers] = False
        rest = keep.nonzero().flatten()
        weight, _, _ = linear_weight(gm, node.args[1])
        x = node.args[0]
        tag = tensor_digest(outliers)
        x_rest = _index_select(gm, x, rest, f"{site.module}_int8_cols", node)
        x_out = _index_select(gm, x, outliers, f"{site.module}_float_cols", node)
        w_out = weight.detach()[:, outliers].contiguous()
        w_out_node = add_buffer(gm, f"{site.module}_float_w", w_out, node)
        replace_linear_weight(gm, node, weight.detach()[:, rest], ("int8_cols", tag))
        node.update_arg(0, x_rest)
        node.meta[LINEAR] = dataclasses.replace(site, in_features=int(rest.numel()))
        set_plan(gm, node, plan.with_width(int(rest.numel())))
        node.meta[CHANNELS] = ChannelStats(stats.channel_min[rest], stats.channel_max[rest],
                                           None if stats.samples is None else stats.samples[:, rest])
        node.meta[FLOAT_SIDE_BYTES] = w_out.numel() * w_out.element_size()
        with graph.inserting_after(node):
            y_out = same_tensor_info(graph.call_function(torch._C._nn.linear, (x_out, w_out_node, None)), node)
        with graph.inserting_after(y_out):
            total = same_tensor_info(graph.call_function(operator.add, (node, y_out)), node)
        node.replace_all_uses_with(total, delete_user_cb=lambda user: user is not total)
        details.append(f"{site.module}: {outliers.numel()} of {site.in_features} columns in float")
        decomposed += 1
        outlier_columns += int(outliers.numel())
    if decomposed:
        graph.lint()
        gm.recompile()
    return PassResult(gm, modified=decomposed > 0,
                      counts={"decomposed": decomposed, "float_columns": outlier_columns}, details=tuple(details))
