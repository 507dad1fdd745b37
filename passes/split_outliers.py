"""Outlier channel splitting (OCS, Zhao et al. 2019): duplicate outlier input channels and halve them.

Greedily, up to ``expand_ratio * in_features`` times per layer, the expanded channel with the largest
magnitude is halved and a copy of it appended. With ``src`` the source channel and ``f`` the factor of
every expanded channel (the factors of one source sum to 1)::

    activation mode:  x' = x[..., src] * f    W' = W[:, src]        (magnitudes from calibration)
    weight mode:      x' = x[..., src]        W' = W[:, src] * f    (magnitudes from |W|, data-free)

so ``x' W'^T = x W^T`` exactly in float while the largest channel (of X or of W) shrinks. In weight
mode the quantization-aware split moves each pair of halves ``Δ/4`` apart (``Δ`` the row's
quantization step), so that they round to different grid points instead of doubling one rounding
error. The extra channels are real: they are in the weight bytes and the GEMM's K.
"""

from __future__ import annotations

import dataclasses
import math
import operator

import torch
import torch.fx as fx

from qcompiler.config import OutlierSplit
from qcompiler.core.ir import CHANNELS, LINEAR, ChannelStats, PassResult, linear_weight, plan_of, set_plan
from qcompiler.passes.graph_utils import add_buffer, replace_linear_weight, same_tensor_info, tensor_digest


def plan_splits(magnitudes: torch.Tensor, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(src, factor)`` of the expanded channels after ``budget`` greedy splits of the largest one."""
    src = list(range(magnitudes.numel()))
    factor = [1.0] * len(src)
    current = magnitudes.double().tolist()
    for _ in range(budget):
        j = max(range(len(current)), key=current.__getitem__)
        if current[j] <= 0:
            break
        factor[j] /= 2
        current[j] /= 2
        src.append(src[j])
        factor.append(factor[j])
        current.append(current[j])
    return torch.tensor(src, dtype=torch.long), torch.tensor(factor, dtype=torch.float64)


def quant_aware_offsets(w_split: torch.Tensor, src: torch.Tensor, qmax: int) -> torch.Tensor:
    """Move the two halves of each split pair Δ/4 apart (Δ = the row's step), where the row's range allows."""
    out = w_split.clone()
    step = out.abs().amax(1, keepdim=True) / qmax  # [N, 1]
    by_source: dict[int, list[int]] = {}
    for j, c in enumerate(src.tolist()):
        by_source.setdefault(c, []).append(j)
    limit = out.abs().amax(1)
    for columns in by_source.values():
        for a, b in zip(columns[0::2], columns[1::2]):
            delta = step[:, 0] / 4
            fits = (out[:, a].abs() + delta <= limit) & (out[:, b].abs() + delta <= limit)
            out[:, a] = torch.where(fits, out[:, a] - delta, out[:, a])
            out[:, b] = torch.where(fits, out[:, b] + delta, out[:, b])
    return out


def split_outliers(gm: fx.GraphModule, config: OutlierSplit) -> PassResult:
    """Split the outlier channels of every linear the plan quantizes."""
    graph = gm.graph
    details, split_layers, extra = [], 0, 0
    for node in list(graph.nodes):
        site = node.meta.get(LINEAR)
        if site is None:
            continue
        plan = plan_of(node)
        scheme = None if plan is None else plan.scheme
        if scheme is None:
            continue
        stats: ChannelStats | None = node.meta.get(CHANNELS)
        weight, _, _ = linear_weight(gm, node.args[1])
        if config.mode == "activation":
            if stats is None:
                details.append(f"{site.module}: not split, no calibration statistics")
                continue
            magnitudes = stats.absmax
        else:
            magnitudes = weight.detach().abs().amax(0)
        budget = max(1, math.ceil(config.expand_ratio * site.in_features))
        src, factor = plan_splits(magnitudes, budget)
        added = src.numel() - site.in_features
        if added == 0:
            continue
        x = node.args[0]
        tag = tensor_digest(src, factor)
        src_node = add_buffer(gm, f"{site.module}_split_src", src, node)
        with graph.inserting_before(node):
            x_split = same_tensor_info(graph.call_function(torch.index_select, (x, -1, src_node)), x)
        w_split = weight.detach()[:, src]
        if config.mode == "activation":
            f_node = add_buffer(gm, f"{site.module}_split_factor", factor.to(weight.dtype), node)
            with graph.inserting_before(node):
                x_split = same_tensor_info(graph.call_function(operator.mul, (x_split, f_node)), x)
            channel_factor = factor
        else:
            w_split = w_split * factor.to(w_split.dtype)
            if config.quant_aware:
                w_split = quant_aware_offsets(w_split, src, scheme.weight.qrange[1])
            channel_factor = torch.ones_like(factor)
        replace_linear_weight(gm, node, w_split, ("split", config.mode, config.quant_aware, tag))
        node.update_arg(0, x_split)
        node.meta[LINEAR] = dataclasses.replace(site, in_features=int(src.numel()))
        set_plan(gm, node, plan.with_width(int(src.numel())))
        if stats is not None:
            f = channel_factor.to(stats.channel_min.dtype)
            samples = None if stats.samples is None else stats.samples[:, src] * f.to(stats.samples.dtype)
            node.meta[CHANNELS] = ChannelStats(stats.channel_min[src] * f, stats.channel_max[src] * f, samples)
        details.append(f"{site.module}: {added} channels split ({config.mode}), K {site.in_features} -> {src.numel()}")
        split_layers += 1
        extra += added
    if split_layers:
        graph.lint()
        gm.recompile()
    return PassResult(gm, modified=split_layers > 0, counts={"split_layers": split_layers, "extra_channels": extra},
                      details=tuple(details))
