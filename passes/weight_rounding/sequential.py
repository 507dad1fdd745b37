"""Data-driven weight rounding (GPTQ, AWQ) run layer by layer over the captured graph.

The model is captured as the backend captures it (one FX graph, canonical linears); the calibration
batches are recorded as the graph's inputs without running the model. Then the graph is executed
*node by node over all batches*: every node runs on every batch before the next node starts. When a
quantizable linear is reached, its inputs for all batches are at hand: their Hessian ``X^T X`` (and
``mean|X|``) is accumulated, the layer's weight is rounded, and the layer then runs with its
*rounded* weight, so later layers are rounded against the inputs the quantized model really gives
them (the "sequential" form of GPTQ). Tensors are freed after their last use, so memory holds the
live activations of one point of the graph for the calibration batches, plus one Hessian at a time.

``AWQ(foldable=True)``: the layers are taken in SmoothQuant's groups (``smoothquant.find_groups``: a norm and
the linears it feeds, ``act(gate) * up`` and down_proj, the value projection and o_proj). The first layer of
a norm group to be reached finds the one ``s`` of the whole group (``awq.search_scales`` over all its
weights: they read the same input, so its Hessian serves all); the others reuse it. down_proj and o_proj get
powers of two (o_proj's tied across the query heads sharing a value head); a layer outside every group, or
in a group some of whose layers the plan keeps in float, keeps ``s = 1`` (clipping only).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.fx as fx
import torch.nn.functional as F
from tqdm.auto import tqdm

from qcompiler.config import AWQ, GPTQ
from qcompiler.core.errors import CalibrationError
from qcompiler.core.ir import LINEAR, RoundedLayer, linear_weight, plan_of, weight_checksum
from qcompiler.passes.graph_utils import ancestors
from qcompiler.passes.smoothquant import Group, find_groups, tie_heads
from qcompiler.passes.weight_rounding.awq import awq_quantize, search_scales
from qcompiler.passes.weight_rounding.gptq import gptq_quantize


def _last_uses(graph: fx.Graph) -> dict[fx.Node, list[fx.Node]]:
    """Nodes whose values can be freed after each node runs."""
    last: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        for inp in node.all_input_nodes:
            last[inp] = node
    frees: dict[fx.Node, list[fx.Node]] = {}
    for value, user in last.items():
        frees.setdefault(user, []).append(value)
    return frees


def _hessian(xs: list[torch.Tensor], k: int, module: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    h = torch.zeros(k, k, dtype=torch.float64)
    abs_sum = torch.zeros(k, dtype=torch.float64)
    rows = 0
    for batch, x in enumerate(xs):
        x2 = x.detach().reshape(-1, k).to(torch.float32)
        if not torch.isfinite(x2).all():
            raise CalibrationError(
                f"GPTQ/AWQ calibration: the input of layer {module!r} holds inf/NaN on batch {batch}; check the "
                "calibration data and the model in float, or skip this layer in the recipe"
            )
        h += (x2.t() @ x2).double()
        abs_sum += x2.abs().sum(0).double()
        rows += x2.shape[0]
    return h, abs_sum / max(rows, 1), rows


def _rounded_sites(graph: fx.Graph) -> list[fx.Node]:
    """The canonical linears the plan quantizes."""
    return [n for n in graph.nodes if LINEAR in n.meta and plan_of(n) is not None and plan_of(n).quantized]


@torch.no_grad()  # the parameters require grad: without this every activation would be kept for backward
def round_weights(gm: fx.GraphModule, calls: list, method: GPTQ | AWQ, progress: bool = True) -> dict[str, RoundedLayer]:
    """Run the graph (canonical, with its plan) node by node over ``calls`` and round the weight of every
    linear the plan quantizes with ``method``."""
    if not isinstance(method, (GPTQ, AWQ)):
        raise ValueError(f"round_weights needs GPTQ or AWQ rounding, got {method!r}")
    graph = gm.graph
    frees = _last_uses(graph)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    env: dict[fx.Node, list] = {node: [call[i] for call in calls] for i, node in enumerate(placeholders)}
    sites = _rounded_sites(graph)
    needed = ancestors(sites)  # what runs after the last rounded layer (the LM head, the logits) is not needed
    results: dict[str, RoundedLayer] = {}
    hessians: dict[fx.Node, tuple] = {}  # by input node: q/k/v (gate/up) share one
    shared = _SharedScales(gm, sites, method) if isinstance(method, AWQ) and method.foldable else None
    bar = tqdm(total=len(sites), desc=f"{type(method).__name__} rounding", disable=not progress)
    for node in graph.nodes:
        if node.op in ("placeholder", "output") or (node not in needed and node not in sites):
            continue
        if node.op == "get_attr":
            env[node] = [getattr(gm, node.target)] * len(calls)
        elif LINEAR in node.meta:
            rounded = _round_site(gm, node, method, env, hessians, shared)
            if rounded is not None:
                results[node.meta[LINEAR].module] = rounded
            bar.update(node in sites)
        else:
            env[node] = [_run_node(gm, node, env, j) for j in range(len(calls))]
        for dead in frees.get(node, ()):
            env.pop(dead, None)
            hessians.pop(dead, None)  # its last reader has run: no linear needs its Hessian any more
    bar.close()
    return results


def _run_node(gm: fx.GraphModule, node: fx.Node, env, j: int):
    args = fx.node.map_arg(node.args, lambda n: env[n][j])
    kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n][j])
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    if node.op == "call_module":
        return gm.get_submodule(node.target)(*args, **kwargs)
    raise CalibrationError(f"cannot run graph node {node.format_node()}")


def _round(weight: torch.Tensor, hessian_entry: tuple, scheme, method: GPTQ | AWQ, scales=None,
           note: str = "") -> RoundedLayer:
    h, act_mean, _ = hessian_entry
    if isinstance(method, GPTQ):
        qw = gptq_quantize(weight, h, scheme.weight, method)
        return RoundedLayer(qw, "gptq", weight_checksum(weight), note=f"damp {method.damp}")
    res = awq_quantize(weight, h, act_mean.to(torch.float32), scheme.weight, method, scales=scales)
    if scales is None:
        note = f"alpha {res.alpha:.2f}"
    keep = scales is None or bool((res.input_scale != 1).any())
    return RoundedLayer(res.weight, "awq", weight_checksum(weight), input_scale=res.input_scale if keep else None,
                        note=note)


class _SharedScales:
    """``AWQ(foldable=True)``'s scales, one per group, found when the group's first layer is reached."""

    def __init__(self, gm: fx.GraphModule, sites: list[fx.Node], method: AWQ):
        self.gm, self.method = gm, method
        groups, _ = find_groups(gm, ("norm", "linear", "attention"))
        rounded = set(sites)
        self.group_of: dict[fx.Node, Group] = {}
        for group in groups:
            if group.kind == "attention" and (group.fold is None or group.fold.module is None):
                continue  # no value projection to fold into
            if all(c in rounded for c in group.consumers):
                self.group_of.update((c, group) for c in group.consumers)
        self.found: dict[int, tuple[torch.Tensor, str]] = {}

    def scales(self, node: fx.Node, hessian_entry: tuple) -> tuple[torch.Tensor, str]:
        """``(s, note)`` for the layer ``node``; ``s`` all ones outside the groups."""
        group = self.group_of.get(node)
        k = node.meta[LINEAR].in_features
        if group is None:
            return torch.ones(k), "s = 1 (no producer to fold 1/s into)"
        if id(group) not in self.found:
            weights = [linear_weight(self.gm, c.args[1])[0] for c in group.consumers]
            schemes = [plan_of(c).scheme.weight for c in group.consumers]
            tie = (lambda t: tie_heads(t, group.fold)) if group.kind == "attention" else None
            h, act_mean, _ = hessian_entry
            alpha, s, _ = search_scales(weights, h, act_mean.to(torch.float32), schemes, self.method, tie=tie,
                                        pow2=group.kind != "norm")
            what = {"norm": "shared by " + group.name, "linear": "powers of two",
                    "attention": "powers of two, tied across heads"}[group.kind]
            self.found[id(group)] = (s, f"alpha {alpha:.2f}, {group.kind} group ({what})")
        return self.found[id(group)]


def _round_site(gm, node: fx.Node, method: GPTQ | AWQ, env, hessians, shared: _SharedScales | None = None
                ) -> RoundedLayer | None:
    """Round ``node``'s weight when the plan quantizes it, then run it (rounded) on every batch."""
    site, plan = node.meta[LINEAR], plan_of(node)
    x_node, w_node = node.args[0], node.args[1]
    bias_node = node.args[2] if len(node.args) > 2 else None
    weight, _, _ = linear_weight(gm, w_node)
    scheme = plan.scheme if plan is not None else None
    # the plan checked the weight's dtype and group; GPTQ/AWQ round per channel or per group only
    usable = scheme is not None and scheme.weight.granularity in ("per_channel", "per_group")
    rounded = None
    w_used = weight
    if usable:
        if x_node not in hessians:
            hessians[x_node] = _hessian(env[x_node], site.in_features, site.module)
        scales, note = shared.scales(node, hessians[x_node]) if shared is not None else (None, "")
        rounded = _round(weight, hessians[x_node], scheme, method, scales, note)
        w_used = rounded.dequantized(weight.dtype)
    outs = []
    for j, x in enumerate(env[x_node]):
        bias = env[bias_node][j] if isinstance(bias_node, fx.Node) else bias_node
        outs.append(F.linear(x, w_used, bias))
    env[node] = outs
    return rounded


def check_rounded(rounded: Mapping[str, RoundedLayer], module: str, weight: torch.Tensor) -> str | None:
    """None when ``rounded[module]`` was computed from ``weight``; otherwise what is wrong."""
    entry = rounded.get(module)
    if entry is None:
        return "no GPTQ/AWQ result for this layer in the calibration statistics"
    if tuple(entry.weight.q.shape) != tuple(weight.shape):
        return f"the rounded weight has shape {tuple(entry.weight.q.shape)}, the layer {tuple(weight.shape)}"
    now = weight_checksum(weight)
    if abs(now - entry.checksum) > 1e-6 * max(1.0, abs(entry.checksum)):
        return "the layer's weight changed since it was rounded (calibrate again)"
    return None
