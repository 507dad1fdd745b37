"""The per-layer plan: for every linear layer, its fitted scheme, the kernel it will run on and why, or
why it stays in float.

Computed once per graph, right after ``canonicalize`` (the ``plan`` step of the pipeline), and stored
on each canonical linear (``node.meta["qcompiler.plan"]``, a :class:`~qcompiler.core.ir.LayerPlan`)
and on the graph (``gm.meta["qcompiler.plan"]``, a :class:`~qcompiler.core.ir.Plan`). The transforms,
calibration's observers and GPTQ/AWQ, ``insert_qdq``, the report, ``qcompiler explain``, export and
the benchmarks read it; nothing else decides a layer's scheme. A transform that changes a layer's width
(outlier splitting, LLM.int8() columns) replaces its entry with ``LayerPlan.with_width`` (float, and
why, when the scheme's group no longer divides the new width), on the node and in the graph's
:class:`Plan` (``ir.set_plan``).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from qcompiler.config import LayerScheme, Recipe
from qcompiler.core.ir import (
    FLOAT_KERNEL,
    LINEAR,
    PLAN,
    LayerPlan,
    LinearSite,
    PassResult,
    Plan,
    linear_weight,
    tensor_info,
)
from qcompiler.lowering.fuse import kernel_choice, static_rows

QUANTIZABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def why_not_quantizable(site: LinearSite, scheme: LayerScheme, weight: torch.Tensor, x) -> str | None:
    """Why the layer cannot take ``scheme`` (already fitted to its width), or None."""
    if weight.dtype not in QUANTIZABLE_DTYPES:
        return f"weight dtype {weight.dtype} is not a float type"
    if scheme.weight.granularity == "per_group" and site.in_features % scheme.weight.group_size:
        return f"in_features {site.in_features} is not a multiple of group_size {scheme.weight.group_size}"
    if not bool(torch.isfinite(weight.detach()).all()):
        bad = int((~torch.isfinite(weight.detach())).sum())
        return (f"its weight holds {bad} inf/NaN value(s): a quantization range cannot be chosen from them "
                "(find where they come from: a bad checkpoint or an overflowing update)")
    if scheme.activation is not None:
        value = tensor_info(x)
        if value is None:
            return "the input activation's shape is unknown (no example_value), so it cannot be quantized"
        if value.dtype not in QUANTIZABLE_DTYPES:
            return f"input activation dtype {value.dtype} is not a float type"
        if value.ndim < 1:
            return "the input activation is a scalar"
    return None


def layer_plan(site: LinearSite, recipe: Recipe, weight: torch.Tensor, x, device: torch.device | None,
               kernels: str = "fast") -> LayerPlan:
    """The plan of one canonical linear: the recipe's scheme fitted to its width, checked, with its kernel."""
    entry = dict(module=site.module, weight_param=site.weight_param, in_features=site.in_features,
                 out_features=site.out_features)
    scheme = recipe.scheme_for(site.module)
    if scheme is None:
        return LayerPlan(**entry, scheme=None, kernel=FLOAT_KERNEL,
                         reason=f"skipped by the recipe's skip pattern {recipe.skip_pattern_for(site.module)!r}")
    fitted = scheme.fitted(site.in_features)
    note = ""
    if fitted is not scheme:
        note = (f"group {fitted.weight.group_size}: in_features {site.in_features} is not a multiple of "
                f"{scheme.weight.group_size}")
    why = why_not_quantizable(site, fitted, weight, x)
    if why is not None:
        return LayerPlan(**entry, scheme=None, kernel=FLOAT_KERNEL, reason=why)
    if device is None:
        kernel, kernel_reason = "", ""
    elif kernels == "reference":
        kernel, kernel_reason = "reference quantize/dequantize ops", "kernels='reference' was asked for"
    else:
        kernel, kernel_reason = kernel_choice(fitted, site.out_features, site.in_features, device, static_rows(x))
    return LayerPlan(**entry, scheme=fitted, reason=note, kernel=kernel, kernel_reason=kernel_reason)


def make_plan(gm: fx.GraphModule, recipe: Recipe, device: torch.device | None = None,
              kernels: str = "fast") -> PassResult:
    """The ``plan`` step: a :class:`~qcompiler.core.ir.LayerPlan` on every canonical linear and the
    :class:`Plan` on ``gm.meta``. The graph's code is unchanged (``modified`` is False)."""
    layers = []
    for node in gm.graph.nodes:
        site = node.meta.get(LINEAR)
        if site is None:
            continue
        weight, _, _ = linear_weight(gm, node.args[1])
        entry = layer_plan(site, recipe, weight, node.args[0], device, kernels)
        node.meta[PLAN] = entry
        layers.append(entry)
    plan = Plan(recipe.name, "" if device is None else str(device), tuple(layers))
    gm.meta[PLAN] = plan
    quantized = len(plan.quantized)
    return PassResult(gm, modified=False, counts={"quantized": quantized, "float": len(layers) - quantized})
