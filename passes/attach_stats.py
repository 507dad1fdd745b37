"""Attach each canonical linear's calibrated input channel range (and sample rows) to the graph.

The transform passes (SmoothQuant, outlier splitting, LLM.int8() decomposition) read
``meta["qcompiler.channels"]`` and keep it true as they change the linear's input.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch.fx as fx

from qcompiler.ir import CHANNELS, LINEAR, ChannelStats, PassResult
from qcompiler.observers import ActivationRanges


def attach_stats(
    gm: fx.GraphModule, raw: Mapping[str, ActivationRanges], skip: Callable[[str], bool] = lambda module: False
) -> PassResult:
    """``skip(module)``: layers that stay in float, whose missing statistics are not worth a note."""
    attached, missing = 0, []
    for node in gm.graph.nodes:
        site = node.meta.get(LINEAR)
        if site is None or skip(site.module):
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
