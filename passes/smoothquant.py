"""SmoothQuant migration: move activation outliers into the weights, per input channel.

For a group (a producer whose output feeds consumer linears only) the pass computes, per channel c,

    s_c = max|X_c| ** alpha / max_consumers |W[:, c]| ** (1 - alpha)

and folds ``1 / s`` into the producer (for ``attention`` groups: multiplies the input by it) and ``s``
into the consumers' weight columns, so
``X W^T = (X / s)(W s)^T`` holds exactly in float while ``X / s`` has a flatter channel range.

Groups are found in the graph, never from model classes:

- ``norm``: a normalization's weight (``mul(w, h)`` of an RMSNorm, ``layer_norm``/``rms_norm`` with
  weight/bias) whose output reaches only canonical linears (q/k/v, gate/up, GPT-2's c_attn/c_fc),
  through reshapes that keep the channel dimension;
- ``linear``: a linear ``U`` whose only use is an elementwise product ``a * U(x)`` read only by a
  linear ``D`` (up -> down through ``act(gate) * up``): ``U``'s rows and bias are divided by ``s``;
- ``attention``: a linear ``O`` reading an attention's output through views and transposes (o_proj).
  Its ``1 / s`` can not be folded into the value projection: that output also goes into the KV cache
  the model returns (and a graph with a cache must compute what the calibration graph, without one,
  computed). So ``O``'s input is multiplied by ``1 / s`` in the graph, a multiply Inductor fuses
  into the activation's quantization. ``s`` is per channel of ``O``'s input, equal across the query
  heads that share a key/value head (grouped-query attention): then the export folds ``1 / s`` into
  the value projection's rows (``meta["qcompiler.value_fold"]`` on the ``1 / s`` buffer says where).

Reads ``meta["qcompiler.channels"]`` (the input's calibrated channel range, and sample rows for
``alpha="auto"``) and updates it to the smoothed range.
"""

from __future__ import annotations

import hashlib
import operator
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.fx as fx

from qcompiler.config import SmoothQuant
from qcompiler.core import primitives
from qcompiler.core.ir import CHANNELS, LINEAR, VALUE_FOLD, PassResult, ValueFold, linear_weight, plan_of
from qcompiler.passes.gqa_attention import repeated_from, shape_of
from qcompiler.passes.graph_utils import (
    add_buffer,
    ancestors,
    bias_of,
    constant_value,
    replace_arg_with_tensor,
    replace_linear_weight,
    same_tensor_info,
    scale_channels,
    tensor_digest,
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
    producer: fx.Node  # attention: the attention op (the consumer's input is divided, nothing is folded)
    consumers: list[fx.Node]
    weight_index: int | None = None  # norm: position of the weight argument
    bias_index: int | None = None  # norm: position of the bias argument
    fold: ValueFold | None = None  # attention: the value projection and the query heads sharing its heads

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


def _final_users(node: fx.Node, passes=None) -> tuple[list[fx.Node], list[fx.Node]]:
    """Users of ``node`` reached through channel-keeping views (or the nodes ``passes`` accepts): (linears
    reading it as x, anything else)."""
    passes = passes or _keeps_channels
    linears, others, frontier = [], [], [node]
    while frontier:
        current = frontier.pop()
        for user in current.users:
            if LINEAR in user.meta and user.args[0] is current:
                linears.append(user)
            elif passes(user):
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
        if producer in ancestors([other], limit=4000) or other is producer:
            continue
        if producer.meta[LINEAR].out_features != node.meta[LINEAR].in_features:
            continue
        return Group("linear", producer, [node])
    return None


_SDPA = {torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention}
_MOVE_METHODS = {"view", "reshape", "transpose", "permute", "contiguous", "to", "flatten"}
_MOVE_FUNCTIONS = {torch.reshape, torch.transpose, torch.permute, torch.flatten}


def _reads_attention(consumer: fx.Node) -> fx.Node | None:
    """The attention whose output reaches ``consumer``'s input only through views and transposes
    (the per-head outputs laid side by side: o_proj, GPT-2's c_proj, BERT's attention output)."""
    node = consumer.args[0]
    while isinstance(node, fx.Node) and len(node.users) == 1:
        if node.op == "call_function" and node.target in _SDPA:
            return node
        if (node.op == "call_method" and node.target in _MOVE_METHODS) or (
                node.op == "call_function" and node.target in _MOVE_FUNCTIONS):
            node = node.args[0]
        else:
            return None
    return None


def _value_fold(sdpa: fx.Node) -> ValueFold | None:
    """The value projection feeding ``sdpa`` and how many query heads share each of its heads (grouped-
    query attention repeats each key/value head, ``repeat_kv``, or passes ``enable_gqa=True``)."""
    query = sdpa.args[0] if sdpa.args else sdpa.kwargs.get("query")
    value = sdpa.args[2] if len(sdpa.args) > 2 else sdpa.kwargs.get("value")
    q_shape, v_shape = shape_of(query), shape_of(value)
    if q_shape is None or v_shape is None or len(q_shape) != 4 or len(v_shape) != 4:
        return None
    repeats = 1
    if sdpa.kwargs.get("enable_gqa"):
        repeats = q_shape[1] // v_shape[1]
    elif (found := repeated_from(value)) is not None:
        value, repeats = found
    if not isinstance(repeats, int) or q_shape[1] != shape_of(value)[1] * repeats:
        return None
    node = value
    while isinstance(node, fx.Node) and LINEAR not in node.meta and len(node.users) == 1 and (
            (node.op == "call_method" and node.target in _MOVE_METHODS)
            or (node.op == "call_function" and node.target in _MOVE_FUNCTIONS)):
        node = node.args[0]
    module = node.meta[LINEAR].module if isinstance(node, fx.Node) and LINEAR in node.meta else None
    return ValueFold(module, repeats, v_shape[-1])


def tie_heads(t: torch.Tensor, fold: ValueFold | None) -> torch.Tensor:
    """Per-channel ``t`` of an attention's output ``[heads * head_dim]`` with the query heads that share a
    value head given their maximum, so a scale built from it is equal across them (foldable into the
    value projection's rows)."""
    if fold is None or fold.repeats == 1:
        return t
    grouped = t.reshape(-1, fold.repeats, fold.head_dim)
    return grouped.amax(1, keepdim=True).expand_as(grouped).reshape(t.shape)


def find_groups(gm: fx.GraphModule, kinds: tuple[str, ...]) -> tuple[list[Group], list[str]]:
    """Smoothing groups in graph order, and notes on candidates that were rejected."""
    groups, notes = [], []
    attention = {}
    if "attention" in kinds:
        for node in gm.graph.nodes:
            if LINEAR in node.meta and (sdpa := _reads_attention(node)) is not None:
                attention[node] = Group("attention", sdpa, [node], fold=_value_fold(sdpa))
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
    qmin, qmax = scheme.qrange
    return primitives.fake_quantize_math(w, scheme.block_size(), qmin, qmax, scheme.symmetric)


def _fake_quant_activation(x: torch.Tensor, scheme, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``x [n, C]`` through the activation scheme; a static range comes from the channel range."""
    if scheme is None:
        return x
    qmin, qmax = scheme.qrange
    if scheme.dynamic:
        return primitives.fake_quantize_math(x, scheme.block_size(2), qmin, qmax, scheme.symmetric)
    scale, zp = primitives.qparams_from_range(lo.min().reshape(1, 1), hi.max().reshape(1, 1), qmin, qmax,
                                              scheme.symmetric)
    return primitives.fake_quantize_math(x, primitives.per_tensor(2), qmin, qmax, scheme.symmetric, scale=scale,
                                         zero_point=zp)


# search_alpha's answers by the digest of all they depend on: calibrating, quantizing and loading (each kernel set)
# run the pass on the same statistics and weights; the search is most of its time (~1 s per group of SmolLM2-135M)
_SEARCHED: OrderedDict[str, tuple[float | None, dict]] = OrderedDict()
_SEARCHED_MAX = 4096


def _search_key(tensors, *rest) -> str:
    digest = hashlib.sha256(repr(rest).encode())
    for t in tensors:
        t = t.detach().contiguous()
        digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def search_alpha(samples, cmin, cmax, weights, schemes, grid, fold: ValueFold | None = None
                 ) -> tuple[float | None, dict]:
    """The alpha of ``grid`` with the smallest output error of the group after quantization.

    ``None`` (no smoothing, ``s = 1``) is a candidate too: it wins when no alpha helps. ``fold``: the
    scales are tied across query heads sharing a value head (:func:`tie_heads`). An answer is kept for the
    process (by the digest of every input): the same search again returns it without searching.
    """
    key = _search_key((samples, cmin, cmax, *weights), schemes, tuple(grid), fold)
    if key in _SEARCHED:
        _SEARCHED.move_to_end(key)
        best, errors = _SEARCHED[key]
        return best, dict(errors)
    best, errors = _search_alpha(samples, cmin, cmax, weights, schemes, grid, fold)
    _SEARCHED[key] = (best, dict(errors))
    if len(_SEARCHED) > _SEARCHED_MAX:
        _SEARCHED.popitem(last=False)
    return best, errors


def _search_alpha(samples, cmin, cmax, weights, schemes, grid, fold):
    x = samples.double()
    refs = [x @ w.double().t() for w in weights]
    act_absmax = tie_heads(cmin.abs().maximum(cmax.abs()), fold)
    w_absmax = tie_heads(torch.stack([w.detach().abs().amax(0) for w in weights]).amax(0), fold)
    errors = {}
    for alpha in (None, *grid):
        if alpha is None:
            s = torch.ones_like(act_absmax, dtype=torch.float64)
        else:
            s = smoothing_scales(act_absmax, w_absmax, alpha)
        err = 0.0
        for w, ref, scheme in zip(weights, refs, schemes):
            w_q = _fake_quant_weight(w.detach().double() * s, scheme.weight)
            x_q = _fake_quant_activation(x / s, scheme.activation, cmin.double() / s, cmax.double() / s)
            err += float((x_q @ w_q.t() - ref).pow(2).sum())
        errors[alpha] = err
    best = min(errors, key=lambda a: (errors[a], 1.0 if a is None else abs(a - 0.5)))
    return best, errors


def divide_norm(gm: fx.GraphModule, group: Group, s: torch.Tensor, stem: str) -> None:
    """A norm group's producer with its weight (and bias) divided by ``s`` per channel (new buffers named
    ``stem_w`` / ``stem_b`` that name the parameters they replace)."""
    producer = group.producer
    for index, suffix in ((group.weight_index, "w"), (group.bias_index, "b")):
        if index is not None:
            t = constant_value(gm, producer.args[index])
            replace_arg_with_tensor(gm, producer, index, t.detach() / s.to(t.dtype), f"{stem}_{suffix}")


def _apply(gm: fx.GraphModule, group: Group, s: torch.Tensor, tag: tuple) -> None:
    for consumer in group.consumers:
        weight, _, _ = linear_weight(gm, consumer.args[1])
        replace_linear_weight(gm, consumer, weight.detach() * s.to(weight.dtype), ("smooth_in",) + tag)
        scale_channels(consumer, s)
    if group.kind == "attention":
        # the value projection's output also goes into the KV cache the model returns, which must
        # stay as it is: divide the consumer's input instead (Inductor fuses the multiply into the
        # activation's quantization)
        consumer = group.consumers[0]
        x = consumer.args[0]
        inv_s = add_buffer(gm, f"{group.name}_inv_s", (1.0 / s).to(weight.dtype), consumer)
        inv_s.meta[VALUE_FOLD] = group.fold or ValueFold(None, 1, 1)  # export: fold it or refuse
        with gm.graph.inserting_before(consumer):
            scaled = same_tensor_info(gm.graph.call_function(operator.mul, (x, inv_s)), x)
        consumer.update_arg(0, scaled)
        return
    producer = group.producer
    if group.kind == "norm":
        divide_norm(gm, group, s, f"{group.name}_norm")
        return
    weight, _, _ = linear_weight(gm, producer.args[1])
    replace_linear_weight(gm, producer, weight.detach() / s.to(weight.dtype)[:, None], ("smooth_out",) + tag)
    bias = bias_of(producer)
    if isinstance(bias, fx.Node):
        b = constant_value(gm, bias)
        replace_arg_with_tensor(gm, producer, 2, b.detach() / s.to(b.dtype), f"{producer.meta[LINEAR].module}_b")


def smoothquant(gm: fx.GraphModule, config: SmoothQuant) -> PassResult:
    """Smooth every group of ``config.groups`` whose consumers the plan quantizes (schemes from the plan)."""
    groups, notes = find_groups(gm, config.groups)
    details = list(notes)
    applied = 0
    for group in groups:
        consumers = group.consumers
        schemes = [None if plan_of(c) is None else plan_of(c).scheme for c in consumers]
        if any(scheme is None for scheme in schemes):
            details.append(f"{group.name}: not smoothed, the plan keeps a consumer in float")
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
                                    config.alpha_grid, group.fold)
            if alpha is None:
                details.append(f"{group.name}: {group.kind} group, not smoothed: no alpha beats s = 1")
                continue
        else:
            alpha = float(config.alpha)
        w_absmax = tie_heads(torch.stack([w.detach().abs().amax(0) for w in weights]).amax(0), group.fold)
        s = smoothing_scales(tie_heads(stats.absmax, group.fold), w_absmax, alpha)
        _apply(gm, group, s, (group.kind, alpha, tensor_digest(s)))
        details.append(f"{group.name}: {group.kind} group, alpha {alpha:g}, s in [{float(s.min()):.3g}, {float(s.max()):.3g}]")
        applied += 1
    if applied:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, modified=applied > 0, counts={"groups": len(groups), "smoothed": applied},
                      details=tuple(details))
