"""Attach each canonical linear's calibrated input channel range (and sample rows) to the graph.

The transform passes (SmoothQuant, outlier splitting, LLM.int8() decomposition) read
``meta["qcompiler.channels"]`` and keep it true as they change the linear's input.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch.fx as fx

from qcompiler.core.ir import CHANNELS, LINEAR, ChannelStats, PassResult, plan_of


def attach_stats(gm: fx.GraphModule, raw: Mapping[str, object]) -> PassResult:
    """``raw``: per module, the calibrated statistics of its float input (``channel_min``, ``channel_max``
    ``[K]`` and optional ``samples [n, K]``; ``qcompiler.calibration.observers.ActivationRanges``). Layers
    the plan keeps in float are left out (their missing statistics are not worth a note)."""
    attached, missing = 0, []
    for node in gm.graph.nodes:
        site, plan = node.meta.get(LINEAR), plan_of(node)
        if site is None or plan is None or not plan.quantized:
            continue
        ranges = raw.get(site.module)
        if ranges is None or ranges.channel_min.numel() != site.in_features:
            missing.append(site.module)
            continue
        node.meta[CHANNELS] = ChannelStats(ranges.channel_min.double(), ranges.channel_max.double(),
                                           None if ranges.samples is None else ranges.samples.double())
        attached += 1
    return PassResult(gm, modified=False, counts={"attached": attached, "without_stats": len(missing)},
                      details=tuple(f"{m}: no calibration statistics" for m in missing))
