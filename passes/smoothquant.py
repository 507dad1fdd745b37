"""SmoothQuant migration: move activation outliers into the weights, per input channel.

For a group (a producer whose output feeds consumer linears only) the pass computes, per channel c,

    s_c = max|X_c| ** alpha / max_consumers |W[:, c]| ** (1 - alpha)

and folds ``1 / s`` into the producer and ``s`` into the consumers' weight columns, so
``X W^T = (X / s)(W s)^T`` holds exactly in float while ``X / s`` has a flatter channel range.

Groups are found in the graph, never from model classes:

- ``norm``: a normalization's weight (``mul(w, h)`` of an RMSNorm, ``layer_norm``/``rms_norm`` with
  weight/bias) whose output reaches only canonical linears (q/k/v, gate/up, GPT-2's c_attn/c_fc),
  through reshapes that keep the channel dimension;
- ``linear``: a linear ``U`` whose only use is an elementwise product ``a * U(x)`` read only by a
  linear ``D`` (up -> down through ``act(gate) * up``): ``U``'s rows and bias are divided by ``s``;
- ``attention``: a linear ``V`` whose output reaches a linear ``O`` only as the value of an attention,
  through views, transposes and head repeats (v -> o). Which ``V`` channel feeds each ``O`` input
  channel is probed by running the graph once on the example inputs (:func:`probe_channel_maps`).

Reads ``meta["qcompiler.channels"]`` (the input's calibrated channel range, and sample rows for
``alpha="auto"``) and updates it to the smoothed range.
"""

from __future__ import annotations

import hashlib
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from qcompiler import primitives
from qcompiler.config import Recipe, SmoothQuant
from qcompiler.ir import CHANNELS, LINEAR, PassResult, linear_weight
from qcompiler.passes.graph_utils import (
    bias_of,
    constant_value,
    replace_arg_with_tensor,
    replace_linear_weight,
    scale_channels,
)

_MUL = {operator.mul, torch.mul, torch.Tensor.mul}
_PASSTHROUGH_METHODS = {"view", "reshape", "to", "contiguous", "float", "type"}
_PASSTHROUGH_FUNCTIONS = {torch.reshape}
_NORM_FUNCTIONS = {torch.nn.functional.layer_norm: (2, 3), torch.layer_norm: (2, 3)}
if hasattr(torch.nn.functional, "rms_norm"):
    _NORM_FUNCTIONS[torch.nn.functional.rms_norm] = (2, None)
    _NORM_FUNCTIONS[torch.rms_norm] = (2, None)
MIN_VALUE = 1e-5


@dataclass
class Group:
    kind: str  # "norm", "linear" or "attention"
    producer: fx.Node
    consumers: list[fx.Node]
    weight_index: int | None = None  # norm: position of the weight argument
    bias_index: int | None = None  # norm: position of the bias argument
    channel_map: torch.Tensor | None = None  # attention: consumer input channel -> producer output channel

    @property
    def name(self) -> str:
        return "+".join(c.meta[LINEAR].module for c in self.consumers)


def _keeps_channels(node: fx.Node) -> bool:
    """A view/reshape/cast that leaves the last (channel) dimension alone."""
    is_passthrough = (node.op == "call_method" and node.target in _PASSTHROUGH_METHODS) or (
        node.op == "call_function" and node.target in _PASSTHROUGH_FUNCTIONS)
    if not is_passthrough:
        return False
    if node.target in ("to", "contiguous", "float", "type"):
        return True
    before, after = node.args[0].meta.get("example_value"), node.meta.get("example_value")
    return (isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor)
            and before.shape[-1] == after.shape[-1])


def _final_users(node: fx.Node) -> tuple[list[fx.Node], list[fx.Node]]:
    """Users of ``node`` reached through channel-keeping views: (linears reading it as x, anything else)."""
    linears, others, frontier = [], [], [node]
    while frontier:
        current = frontier.pop()
        for user in current.users:
            if LINEAR in user.meta and user.args[0] is current:
                linears.append(user)
            elif _keeps_channels(user):
                frontier.append(user)
            else:
                others.append(user)
    return linears, others


def _norm_group(gm: fx.GraphModule, node: fx.Node) -> Group | None:
    if node.op != "call_function":
        return None
    if node.target in _MUL and len(node.args) == 2:
        for i, arg in enumerate(node.args):
            value = constant_value(gm, arg)
            if value is not None and value.dim() == 1 and value.is_floating_point():
                return Group("norm", node, [], weight_index=i)
        return None
    if node.target in _NORM_FUNCTIONS:
        w_i, b_i = _NORM_FUNCTIONS[node.target]
        if len(node.args) > w_i and constant_value(gm, node.args[w_i]) is not None:
            has_bias = b_i is not None and len(node.args) > b_i and constant_value(gm, node.args[b_i]) is not None
            return Group("norm", node, [], weight_index=w_i, bias_index=b_i if has_bias else None)
    return None


def _ancestors(node: fx.Node, stop: int = 4000) -> set[fx.Node]:
    seen, frontier = set(), [node]
    while frontier and len(seen) < stop:
        current = frontier.pop()
        for parent in current.all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                frontier.append(parent)
    return seen


def _linear_group(node: fx.Node) -> Group | None:
    """``node`` is a consumer D whose input is ``a * U(x)``; returns the group with producer U."""
    if LINEAR not in node.meta:
        return None
    product = node.args[0]
    if not (isinstance(product, fx.Node) and product.op == "call_function" and product.target in _MUL
            and len(product.args) == 2 and all(isinstance(a, fx.Node) for a in product.args)):
        return None
    linears, others = _final_users(product)
    if others or linears != [node]:
        return None
    for i, factor in enumerate(product.args):
        producer = factor
        while _keeps_channels(producer) and len(producer.users) == 1:
            producer = producer.args[0]
        if LINEAR not in producer.meta or len(producer.users) != 1:
            continue
        other = product.args[1 - i]
        if producer in _ancestors(other) or other is producer:
            continue
        if producer.meta[LINEAR].out_features != node.meta[LINEAR].in_features:
            continue
        return Group("linear", producer, [node])
    return None


_SDPA = {torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention}
_MOVE_METHODS = {"view", "reshape", "transpose", "permute", "contiguous", "expand", "to", "flatten", "unsqueeze"}
_MOVE_FUNCTIONS = {torch.reshape, torch.transpose, torch.permute, torch.flatten, torch.unsqueeze, operator.getitem}


def _attention_producer(consumer: fx.Node) -> fx.Node | None:
    """The linear whose output reaches ``consumer``'s input only as the value of an attention,
    through ops that move channels without mixing them (views, transposes, head repeats)."""
    node, through_attention = consumer.args[0], False
    while isinstance(node, fx.Node) and len(node.users) == 1:
        if LINEAR in node.meta:
            return node if through_attention else None
        if node.op == "call_function" and node.target in _SDPA:
            value = node.args[2] if len(node.args) > 2 else node.kwargs.get("value")
            node, through_attention = value, True
        elif (node.op == "call_method" and node.target in _MOVE_METHODS) or (
                node.op == "call_function" and node.target in _MOVE_FUNCTIONS):
            node = node.args[0]
        else:
            return None
    return None


def probe_channel_maps(gm: fx.GraphModule, example_inputs, pairs: list[tuple[fx.Node, fx.Node]]) -> dict:
    """For (producer, consumer) pairs, which producer channel feeds each consumer input channel.

    Runs the graph once with each producer's output replaced by its channel number + 1, the same for
    every token: attention averages over tokens with weights summing to 1, views and head repeats only
    move values, so each consumer input channel reads the number of its source channel.
    """
    producers = {p: p.meta[LINEAR].out_features for p, _ in pairs}
    consumers = {c for _, c in pairs}
    seen: dict[fx.Node, torch.Tensor] = {}

    class Prober(fx.Interpreter):
        def run_node(self, n):
            if n in consumers:
                seen[n] = self.env[n.args[0]].detach()
            out = super().run_node(n)
            if n in producers:
                code = torch.arange(1, producers[n] + 1, dtype=out.dtype, device=out.device)
                out = code.expand_as(out).contiguous()
            return out

    with torch.no_grad():
        Prober(gm).run(*example_inputs)
    maps = {}
    for producer, consumer in pairs:
        value = seen.get(consumer)
        if value is None:
            continue
        rows = value.double().reshape(-1, value.shape[-1])
        codes = rows[0].round()
        exact = torch.isfinite(rows).all() and (rows - codes).abs().max() < 1e-3
        if exact and codes.min() >= 1 and codes.max() <= producers[producer]:
            maps[consumer] = codes.long() - 1
    return maps


def find_groups(gm: fx.GraphModule, kinds: tuple[str, ...], example_inputs=None) -> tuple[list[Group], list[str]]:
    """Smoothing groups in graph order, and notes on candidates that were rejected.

    ``"attention"`` groups need ``example_inputs`` (real tensors) to probe the channel map.
    """
    groups, notes = [], []
    if "attention" in kinds:
        pairs = [(p, n) for n in gm.graph.nodes if LINEAR in n.meta and (p := _attention_producer(n)) is not None]
        maps = probe_channel_maps(gm, example_inputs, pairs) if pairs and example_inputs is not None else {}
        attention = {}
        for producer, consumer in pairs:
            if consumer in maps:
                attention[consumer] = Group("attention", producer, [consumer], channel_map=maps[consumer])
            else:
                notes.append(f"{producer.meta[LINEAR].module} -> {consumer.meta[LINEAR].module}: not smoothed, "
                             "the channel map through the attention could not be established")
    for node in gm.graph.nodes:
        if "attention" in kinds and node in attention:
            groups.append(attention[node])
            continue
        group = _norm_group(gm, node) if "norm" in kinds else None
        if group is not None:
            linears, others = _final_users(node)
            if not linears:
                continue
            if others:
                names = ", ".join(sorted({o.name for o in others}))
                notes.append(f"norm before {'+'.join(l.meta[LINEAR].module for l in linears)}: not smoothed, "
                             f"its output is also used by {names}")
                continue
            group.consumers = linears
            groups.append(group)
            continue
        if "linear" in kinds:
            group = _linear_group(node)
            if group is not None:
                groups.append(group)
    return groups, notes


# --- the algorithm -----------------------------------------------------------------------------------


def smoothing_scales(act_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s = act^alpha / w^(1-alpha)``; channels with no activation or no weight keep ``s = 1``."""
    act = act_absmax.double().clamp_min(MIN_VALUE)
    w = w_absmax.double().clamp_min(MIN_VALUE)
    s = act.pow(alpha) / w.pow(1 - alpha)
    dead = (act_absmax <= 0) | (w_absmax <= 0)
    return torch.where(dead, torch.ones_like(s), s.clamp(MIN_VALUE, 1 / MIN_VALUE))


def _fake_quant_weight(w: torch.Tensor, scheme) -> torch.Tensor:
    block = scheme.block_size()
    qmin, qmax = scheme.qrange
    scale, zp = primitives.choose_qparams_math(w, block, qmin, qmax, scheme.symmetric)
    q = primitives.quantize_math(w, scale, None if scheme.symmetric else zp, block, qmin, qmax, torch.int32)
    return primitives.dequantize_math(q, scale, None if scheme.symmetric else zp, block, w.dtype)


def _fake_quant_activation(x: torch.Tensor, scheme, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``x [n, C]`` through the activation scheme; a static range comes from the channel range."""
    if scheme is None:
        return x
    qmin, qmax = scheme.qrange
    if scheme.dynamic:
        block = scheme.block_size(2)
        scale, zp = primitives.choose_qparams_math(x, block, qmin, qmax, scheme.symmetric)
    else:
        block = primitives.per_tensor(2)
        scale, zp = primitives.qparams_from_range(lo.min().reshape(1, 1), hi.max().reshape(1, 1), qmin, qmax,
                                                  scheme.symmetric)
    zp = None if scheme.symmetric else zp
    q = primitives.quantize_math(x, scale, zp, block, qmin, qmax, torch.int32)
    return primitives.dequantize_math(q, scale, zp, block, x.dtype)


def group_scales(act_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float,
                 channel_map: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s for the consumers' input channels, s for the producer's output channels)``.

    With a channel map (several consumer channels may read one producer channel, as repeated
    attention heads do) the statistics are reduced to the producer's channels first.
    """
    if channel_map is None:
        s = smoothing_scales(act_absmax, w_absmax, alpha)
        return s, s
    n = int(channel_map.max()) + 1
    act = torch.zeros(n, dtype=torch.float64).scatter_reduce(0, channel_map, act_absmax.double(), "amax")
    w = torch.zeros(n, dtype=torch.float64).scatter_reduce(0, channel_map, w_absmax.double(), "amax")
    s = smoothing_scales(act, w, alpha)
    return s[channel_map], s


def search_alpha(samples, cmin, cmax, weights, schemes, grid, channel_map=None) -> tuple[float | None, dict]:
    """The alpha of ``grid`` with the smallest output error of the group after quantization.

    ``None`` (no smoothing, ``s = 1``) is a candidate too: it wins when no alpha helps.
    """
    x = samples.double()
    refs = [x @ w.double().t() for w in weights]
    act_absmax = cmin.abs().maximum(cmax.abs())
    w_absmax = torch.stack([w.detach().abs().amax(0) for w in weights]).amax(0)
    errors = {}
    for alpha in (None, *grid):
        if alpha is None:
            s = torch.ones_like(act_absmax, dtype=torch.float64)
        else:
            s, _ = group_scales(act_absmax, w_absmax, alpha, channel_map)
        err = 0.0
        for w, ref, scheme in zip(weights, refs, schemes):
            w_q = _fake_quant_weight(w.detach().double() * s, scheme.weight)
            x_q = _fake_quant_activation(x / s, scheme.activation, cmin.double() / s, cmax.double() / s)
            err += float((x_q @ w_q.t() - ref).pow(2).sum())
        errors[alpha] = err
    best = min(errors, key=lambda a: (errors[a], 1.0 if a is None else abs(a - 0.5)))
    return best, errors


def _apply(gm: fx.GraphModule, group: Group, s: torch.Tensor, s_producer: torch.Tensor, tag: tuple) -> None:
    for consumer in group.consumers:
        weight, _, _ = linear_weight(gm, consumer.args[1])
        replace_linear_weight(gm, consumer, weight.detach() * s.to(weight.dtype), ("smooth_in",) + tag)
        scale_channels(consumer, s)
    producer = group.producer
    if group.kind == "norm":
        w = constant_value(gm, producer.args[group.weight_index])
        replace_arg_with_tensor(gm, producer, group.weight_index, w.detach() / s.to(w.dtype), f"{group.name}_norm_w")
        if group.bias_index is not None:
            b = constant_value(gm, producer.args[group.bias_index])
            replace_arg_with_tensor(gm, producer, group.bias_index, b.detach() / s.to(b.dtype), f"{group.name}_norm_b")
        return
    weight, _, _ = linear_weight(gm, producer.args[1])
    replace_linear_weight(gm, producer, weight.detach() / s_producer.to(weight.dtype)[:, None], ("smooth_out",) + tag)
    bias = bias_of(producer)
    if isinstance(bias, fx.Node):
        b = constant_value(gm, bias)
        replace_arg_with_tensor(gm, producer, 2, b.detach() / s_producer.to(b.dtype), f"{producer.meta[LINEAR].module}_b")


def smoothquant(gm: fx.GraphModule, recipe: Recipe, config: SmoothQuant, example_inputs=None) -> PassResult:
    groups, notes = find_groups(gm, config.groups, example_inputs)
    details = list(notes)
    applied = 0
    for group in groups:
        consumers = group.consumers
        schemes = [recipe.scheme_for(c.meta[LINEAR].module) for c in consumers]
        if any(scheme is None for scheme in schemes):
            details.append(f"{group.name}: not smoothed, the recipe keeps a consumer in float")
            continue
        stats = consumers[0].meta.get(CHANNELS)
        if stats is None:
            details.append(f"{group.name}: not smoothed, no calibration statistics for its input")
            continue
        weights = [linear_weight(gm, c.args[1])[0] for c in consumers]
        if config.alpha == "auto":
            if stats.samples is None:
                details.append(f"{group.name}: not smoothed, alpha='auto' needs sample rows: calibrate with this recipe")
                continue
            alpha, _ = search_alpha(stats.samples, stats.channel_min, stats.channel_max, weights, schemes,
                                    config.alpha_grid, group.channel_map)
            if alpha is None:
                details.append(f"{group.name}: {group.kind} group, not smoothed: no alpha beats s = 1")
                continue
        else:
            alpha = float(config.alpha)
        w_absmax = torch.stack([w.detach().abs().amax(0) for w in weights]).amax(0)
        s, s_producer = group_scales(stats.absmax, w_absmax, alpha, group.channel_map)
        _apply(gm, group, s, s_producer, (group.kind, alpha, hashlib.sha1(s.numpy().tobytes()).hexdigest()[:16]))
        details.append(f"{group.name}: {group.kind} group, alpha {alpha:g}, s in [{float(s.min()):.3g}, {float(s.max()):.3g}]")
        applied += 1
    if applied:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, modified=applied > 0, counts={"groups": len(groups), "smoothed": applied},
                      details=tuple(details))
