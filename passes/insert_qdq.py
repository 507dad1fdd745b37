"""Insert quantize/dequantize around canonical linears, as the plan says per layer.

For a layer with scheme ``W: int8 per-channel, A: int8 dynamic per-token`` the canonical
``linear(x, W, b)`` becomes::

    w_dq = qcompiler.dequantize(w_q, w_scale, None, (1, -1), float32)       # w_q, w_scale: buffers
    s, z = qcompiler.choose_qparams(x, (1, .., 1, -1), -127, 127, True)   # at run time
    x_dq = qcompiler.dequantize(qcompiler.quantize(x, s, None, ...), s, None, ...)
    y    = linear(x_dq, w_dq, b)

A static activation range (from calibration stats, chosen by the scheme's observer) replaces
``choose_qparams`` with constant buffers ``x_scale``/``x_zero_point``.

The float parameter placeholder is left unused. This graph computes exactly what the integer
kernels compute (in float) and is the reference the lowering is tested against. Layers the plan keeps
in float stay as they are; every canonical linear gets a :class:`~qcompiler.core.ir.LayerDecision`
saying how it was quantized or why not.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping

import torch
import torch.fx as fx

from qcompiler.config import AWQ, GPTQ, HQQ
from qcompiler.core import primitives
from qcompiler.core.errors import StatsError
from qcompiler.core.ir import (
    DECISION,
    FLOAT_SIDE_BYTES,
    FLOAT_WEIGHT,
    LINEAR,
    QLINEAR,
    VALUE_FOLD,
    LayerDecision,
    LayerPlan,
    LinearSite,
    PassResult,
    QLinearSpec,
    QuantizedWeight,
    ValueFold,
    fresh_name,
    linear_weight,
    plan_of,
    tensor_info,
)
from qcompiler.core.weight_cache import WEIGHTS, WeightCache
from qcompiler.passes.graph_utils import decisions_result, same_tensor_info
from qcompiler.passes.weight_rounding import round_to_nearest
from qcompiler.passes.weight_rounding.hqq import hqq_quantize
from qcompiler.passes.weight_rounding.sequential import check_rounded


def _dequantize_weight_nodes(gm, graph, prefix: str, qw: QuantizedWeight, dtype: torch.dtype):
    gm.register_buffer(prefix + "_w_q", qw.q)
    gm.register_buffer(prefix + "_w_scale", qw.scale)
    names = (prefix + "_w_q", prefix + "_w_scale", None)
    w_q, w_scale = graph.get_attr(names[0]), graph.get_attr(names[1])
    w_zp = None
    if qw.zero_point is not None:
        names = names[:2] + (prefix + "_w_zero_point",)
        gm.register_buffer(names[2], qw.zero_point)
        w_zp = graph.get_attr(names[2])
    w_dq = graph.call_function(
        torch.ops.qcompiler.dequantize.default, (w_q, w_scale, w_zp, list(qw.block_size), dtype)
    )
    return w_dq, names


def _static_qparams(stats: Mapping, site: LinearSite, scheme) -> tuple[torch.Tensor, torch.Tensor]:
    ranges = stats[site.module]
    if ranges.channel_min.numel() != site.in_features:
        raise StatsError(
            f"the calibration statistics of {site.module!r} have {ranges.channel_min.numel()} input channels, "
            f"the model's layer has {site.in_features}: these stats come from another model; calibrate this one"
        )
    lo, hi = ranges.range(scheme.observer, scheme.bits, scheme.symmetric, scheme.percentile)
    qmin, qmax = scheme.qrange
    return primitives.qparams_from_range(torch.tensor(lo), torch.tensor(hi), qmin, qmax, scheme.symmetric)


def _activation_qparam_nodes(gm, graph, prefix: str, x: fx.Node, scheme, ndim: int, static_qparams):
    """Scale and zero-point nodes: buffers for a static range, choose_qparams at run time otherwise."""
    if static_qparams is not None:
        scale, zero_point = static_qparams
        gm.register_buffer(prefix + "_x_scale", scale.reshape([1] * ndim))
        names = (prefix + "_x_scale", None)
        scale_node, zp_node = graph.get_attr(prefix + "_x_scale"), None
        if not scheme.symmetric:
            gm.register_buffer(prefix + "_x_zero_point", zero_point.reshape([1] * ndim))
            names = (names[0], prefix + "_x_zero_point")
            zp_node = graph.get_attr(prefix + "_x_zero_point")
        return scale_node, zp_node, names
    qmin, qmax = scheme.qrange
    qparams = graph.call_function(
        torch.ops.qcompiler.choose_qparams.default, (x, list(scheme.block_size(ndim)), qmin, qmax, scheme.symmetric)
    )
    scale = graph.call_function(operator.getitem, (qparams, 0))
    zero_point = None if scheme.symmetric else graph.call_function(operator.getitem, (qparams, 1))
    return scale, zero_point, (None, None)


def _fake_quant_activation_nodes(graph, x: fx.Node, scheme, ndim: int, dtype: torch.dtype, scale, zero_point):
    block = list(scheme.block_size(ndim))
    qmin, qmax = scheme.qrange
    q = graph.call_function(
        torch.ops.qcompiler.quantize.default,
        (x, scale, zero_point, block, qmin, qmax, primitives.storage_dtype(qmin, qmax)),
    )
    return graph.call_function(torch.ops.qcompiler.dequantize.default, (q, scale, zero_point, block, dtype))


def _check_stats_cover(gm: fx.GraphModule, recipe_name: str, stats: Mapping | None) -> None:
    needed = []
    for node in gm.graph.nodes:
        plan = plan_of(node) if LINEAR in node.meta else None
        scheme = plan.scheme if plan is not None else None
        if scheme is not None and scheme.activation is not None and not scheme.activation.dynamic:
            needed.append(plan.module)
    if not needed:
        return
    if stats is None:
        raise StatsError(f"recipe {recipe_name!r} needs calibration statistics for {len(needed)} layer(s); "
                         "pass options={'stats': qcompiler.calibrate(model, batches, recipe)}")
    missing = sorted(set(m for m in needed if m not in stats))
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise StatsError(
            f"the calibration statistics have no entry for {len(missing)} layer(s) of this model: {shown}. "
            "Calibrate this model (with a recipe that does not skip these layers)."
        )


def _rounded_weight(site, scheme, weight, owner, weight_key, rounding, recipe_name: str, rounded, cache):
    """``(QuantizedWeight, AWQ input scale or None, note)`` by the rounding method."""
    if isinstance(rounding, HQQ) and not scheme.weight.symmetric:  # symmetric layers: no zero point to fit
        qw = cache.get(owner, ("hqq", scheme.weight, rounding) + weight_key,
                       lambda: hqq_quantize(weight.detach(), scheme.weight, rounding))
        return qw, None, "HQQ zero points"
    if isinstance(rounding, (GPTQ, AWQ)):
        problem = check_rounded(rounded or {}, site.module, weight)
        if problem is not None:
            raise StatsError(f"{site.module}: {problem}. Calibrate this model with the recipe "
                             f"({recipe_name!r}) and pass those statistics.")
        entry = rounded[site.module]
        return entry.weight, entry.input_scale, f"{entry.method.upper()} {entry.note}".strip()
    qw = cache.get(owner, ("rtn", scheme.weight) + weight_key, lambda: round_to_nearest(weight.detach(), scheme.weight))
    return qw, None, ""


def _divide_input(gm, graph, prefix: str, x: fx.Node, input_scale: torch.Tensor, fold: ValueFold | None) -> fx.Node:
    """``x / s`` at run time (AWQ); ``fold``: the value projection export folds ``1 / s`` into (None: none)."""
    info = tensor_info(x)
    dtype = info.dtype if info is not None else torch.float32
    gm.register_buffer(prefix + "_x_inv_scale", (1.0 / input_scale).to(dtype))
    inv = graph.get_attr(prefix + "_x_inv_scale")
    inv.meta[VALUE_FOLD] = fold or ValueFold(None, 1, 1)  # export: fold it or refuse
    scaled = graph.call_function(torch.mul, (x, inv))
    same_tensor_info(scaled, x)
    return scaled


def _float_decision(site: LinearSite, plan: LayerPlan | None, weight, float_bytes: int, reason: str) -> LayerDecision:
    scheme = "" if plan is None or plan.scheme is None else plan.scheme.describe()
    return LayerDecision(site.module, False, site.weight_param, scheme, reason=reason,
                         bits_per_weight=8.0 * weight.element_size(), weight_bytes=float_bytes,
                         float_weight_bytes=float_bytes)


def _qlinear_spec(site: LinearSite, scheme, qw: QuantizedWeight, names, act_names, has_bias: bool) -> QLinearSpec:
    act = scheme.activation
    return QLinearSpec(
        module=site.module, weight_bits=scheme.weight.bits, weight_symmetric=scheme.weight.symmetric,
        weight_granularity=scheme.weight.granularity, group_size=scheme.weight.group_size,
        activation=act.kind if act is not None else None, activation_bits=act.bits if act is not None else None,
        activation_symmetric=act.symmetric if act is not None else None,
        w_q=names[0], w_scale=names[1], w_zero_point=names[2], has_bias=has_bias,
        x_scale=act_names[0], x_zero_point=act_names[1],
    )


def _quantize_node(gm, node: fx.Node, scheme, qw: QuantizedWeight, input_scale, ranges) -> QLinearSpec:
    """Rewrite ``node`` into its QDQ form with the rounded weight ``qw``; returns its spec."""
    graph, site = gm.graph, node.meta[LINEAR]
    x, w_node, bias = node.args[0], node.args[1], node.args[2] if len(node.args) > 2 else None
    weight, _, _ = linear_weight(gm, w_node)
    prefix = fresh_name(gm, site.module or "linear", "_w_q")
    with graph.inserting_before(node):
        w_dq, names = _dequantize_weight_nodes(gm, graph, prefix, qw, weight.dtype)
        if input_scale is not None:  # AWQ: the layer reads x / s
            x = _divide_input(gm, graph, prefix, x, input_scale, node.meta.get(VALUE_FOLD))
        new_x, act_names, act = x, (None, None), scheme.activation
        if act is not None:
            value = tensor_info(x)
            static = None if act.dynamic else _static_qparams(ranges, site, act)
            scale, zero_point, act_names = _activation_qparam_nodes(gm, graph, prefix, x, act, value.ndim, static)
            new_x = _fake_quant_activation_nodes(graph, x, act, value.ndim, value.dtype, scale, zero_point)
    node.args = (new_x, w_dq, bias)
    node.meta[FLOAT_WEIGHT] = w_node
    return _qlinear_spec(site, scheme, qw, names, act_names, bias is not None)


def insert_qdq(
    gm: fx.GraphModule,
    rounding: GPTQ | AWQ | HQQ | None = None,
    recipe_name: str = "",
    cache: WeightCache = WEIGHTS,
    ranges: Mapping | None = None,
    rounded: Mapping | None = None,
) -> PassResult:
    """Quantize every linear the plan quantizes. ``rounding``: the recipe's rounding method (None: round
    to nearest). ``ranges``: calibrated statistics of the linears' inputs by module (``ActivationRanges``),
    required for static layers. ``rounded``: GPTQ/AWQ weights by module (``CalibrationStats.weights``)."""
    _check_stats_cover(gm, recipe_name, ranges)
    decisions = []
    for node in list(gm.graph.nodes):
        site: LinearSite | None = node.meta.get(LINEAR)
        if site is None or QLINEAR in node.meta:
            continue
        plan = plan_of(node)
        weight, owner, weight_key = linear_weight(gm, node.args[1])
        float_bytes = owner.numel() * owner.element_size()  # the parameter as the user's model stores it
        scheme = None if plan is None else plan.scheme
        if scheme is None:
            reason = "no plan for this layer" if plan is None else plan.reason
            decision = _float_decision(site, plan, weight, float_bytes, reason)
        else:
            qw, input_scale, rounding_note = _rounded_weight(site, scheme, weight, owner, weight_key, rounding,
                                                             recipe_name, rounded, cache)
            node.meta[QLINEAR] = _quantize_node(gm, node, scheme, qw, input_scale, ranges)
            float_side = node.meta.get(FLOAT_SIDE_BYTES, 0)
            stored = qw.nbytes  # the stored form's bytes (read from the tensors once)
            side = f"{float_side} bytes of outlier columns kept in float" if float_side else ""
            note = "; ".join(filter(None, [rounding_note, plan.reason, side]))
            decision = LayerDecision(site.module, True, site.weight_param, scheme.describe(), reason=note,
                                     bits_per_weight=8.0 * stored / qw.q.numel(), weight_bytes=stored + float_side,
                                     float_weight_bytes=float_bytes)
        node.meta[DECISION] = decision
        decisions.append(decision)
    return decisions_result(gm, decisions)
