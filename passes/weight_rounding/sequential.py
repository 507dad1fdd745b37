"""Data-driven weight rounding (GPTQ, AWQ) run layer by layer over the captured graph.

The model is captured as the backend captures it (one FX graph, canonical linears); the calibration
batches are recorded as the graph's inputs without running the model. Then the graph is executed
*node by node over all batches*: every node runs on every batch before the next node starts. When a
quantizable linear is reached, its inputs for all batches are at hand: their Hessian ``X^T X`` (and
``mean|X|``) is accumulated, the layer's weight is rounded, and the layer then runs with its
*rounded* weight, so later layers are rounded against the inputs the quantized model really gives
them (the "sequential" form of GPTQ). Tensors are freed after their last use, so memory holds the
live activations of one point of the graph for the calibration batches, plus one Hessian at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from tqdm.auto import tqdm

from qcompiler.config import AWQ, GPTQ, Recipe
from qcompiler.errors import CalibrationError
from qcompiler.ir import LINEAR, LinearSite, linear_weight
from qcompiler.passes.weight_rounding.awq import awq_quantize
from qcompiler.passes.weight_rounding.common import group_size_of
from qcompiler.passes.weight_rounding.gptq import gptq_quantize
from qcompiler.passes.weight_rounding.rtn import QuantizedWeight


@dataclass(frozen=True, eq=False)
class RoundedLayer:
    """A layer's weight as GPTQ/AWQ rounded it. ``input_scale`` (AWQ): the layer's input is divided
    by it. ``checksum``: ``sum |W|`` of the float weight it came from, to catch stale results."""

    weight: QuantizedWeight
    method: str
    checksum: float
    input_scale: torch.Tensor | None = None
    note: str = ""

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight the layer computes with, as seen by its original (unscaled) input."""
        w = self.weight.dequantize(torch.float32)
        if self.input_scale is not None:
            w = w / self.input_scale
        return w.to(dtype)


def weight_checksum(weight: torch.Tensor) -> float:
    return float(weight.detach().double().abs().sum())


class _Recorded(Exception):
    """Raised by the recording backend instead of running the graph."""


def record(model: torch.nn.Module, batches: list, run_batch: Callable, prepare: Callable):
    """The captured graph and, per batch, the graph's input values (the model is not run)."""
    graphs: list[tuple[fx.GraphModule, list]] = []

    def backend(gm, example_inputs, **_):
        prepare(gm, example_inputs)
        calls: list = []
        graphs.append((gm, calls))

        def run(*args):
            calls.append(args)
            raise _Recorded

        return run

    compiled = torch.compile(model, backend=backend)
    with torch.inference_mode():
        for batch in batches:
            try:
                run_batch(compiled, batch)
            except _Recorded:
                continue
            raise CalibrationError("GPTQ/AWQ calibration: the model ran without reaching its captured graph")
    torch._dynamo.reset()
    if len(graphs) != 1:
        raise CalibrationError(
            f"GPTQ/AWQ calibration needs the model captured as one graph for batches of one shape; got "
            f"{len(graphs)} graphs (graph breaks, or calibration batches of different shapes)"
        )
    return graphs[0]


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


def _hessian(xs: list[torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    h = torch.zeros(k, k, dtype=torch.float64)
    abs_sum = torch.zeros(k, dtype=torch.float64)
    rows = 0
    for x in xs:
        x2 = x.detach().reshape(-1, k).to(torch.float32)
        if not torch.isfinite(x2).all():
            raise CalibrationError("inf/NaN in a linear layer's calibration input")
        h += (x2.t() @ x2).double()
        abs_sum += x2.abs().sum(0).double()
        rows += x2.shape[0]
    return h, abs_sum / max(rows, 1), rows


@torch.no_grad()  # the parameters require grad: without this every activation would be kept for backward
def round_weights(gm: fx.GraphModule, calls: list, recipe: Recipe, progress: bool = True) -> dict[str, RoundedLayer]:
    """Run the graph node by node over ``calls`` and round every quantizable linear's weight."""
    method = recipe.rounding
    if not isinstance(method, (GPTQ, AWQ)):
        raise ValueError(f"round_weights needs a GPTQ or AWQ recipe, got rounding={method!r}")
    graph = gm.graph
    frees = _last_uses(graph)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    env: dict[fx.Node, list] = {node: [call[i] for call in calls] for i, node in enumerate(placeholders)}
    sites = [n for n in graph.nodes if LINEAR in n.meta and recipe.scheme_for(n.meta[LINEAR].module) is not None]
    needed = _ancestors(sites)  # what runs after the last rounded layer (the LM head, the logits) is not needed
    results: dict[str, RoundedLayer] = {}
    hessians: dict[fx.Node, tuple] = {}  # by input node: q/k/v (gate/up) share one
    bar = tqdm(total=len(sites), desc=f"{type(method).__name__} rounding", disable=not progress)
    for node in graph.nodes:
        if node.op in ("placeholder", "output") or (node not in needed and node not in sites):
            continue
        if node.op == "get_attr":
            value = getattr(gm, node.target)
            env[node] = [value] * len(calls)
            continue
        site: LinearSite | None = node.meta.get(LINEAR)
        if site is not None:
            rounded = _round_site(gm, node, site, recipe, env, hessians)
            if rounded is not None:
                results[site.module] = rounded
            if node in sites:
                bar.update(1)
        else:
            env[node] = [_run_node(gm, node, env, j) for j in range(len(calls))]
        for dead in frees.get(node, ()):
            env.pop(dead, None)
            hessians.pop(dead, None)  # its last reader has run: no linear needs its Hessian any more
    bar.close()
    return results


def _ancestors(nodes: list[fx.Node]) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    frontier = [inp for node in nodes for inp in node.all_input_nodes]
    while frontier:
        node = frontier.pop()
        if node not in seen:
            seen.add(node)
            frontier.extend(node.all_input_nodes)
    return seen


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


def _round_site(gm, node: fx.Node, site: LinearSite, recipe: Recipe, env, hessians) -> RoundedLayer | None:
    x_node, w_node = node.args[0], node.args[1]
    bias_node = node.args[2] if len(node.args) > 2 else None
    weight, _, _ = linear_weight(gm, w_node)
    scheme = recipe.scheme_for(site.module)
    scheme = None if scheme is None else scheme.fitted(site.in_features)
    usable = scheme is not None and weight.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    if usable:
        try:
            group_size_of(scheme.weight, site.in_features)
        except ValueError:
            usable = False
    rounded = None
    w_used = weight
    if usable:
        if x_node not in hessians:
            hessians[x_node] = _hessian(env[x_node], site.in_features)
        h, act_mean, _ = hessians[x_node]
        method = recipe.rounding
        if isinstance(method, GPTQ):
            qw = gptq_quantize(weight, h, scheme.weight, method)
            rounded = RoundedLayer(qw, "gptq", weight_checksum(weight), note=f"damp {method.damp}")
        else:
            res = awq_quantize(weight, h, act_mean.to(torch.float32), scheme.weight, method)
            rounded = RoundedLayer(res.weight, "awq", weight_checksum(weight), input_scale=res.input_scale,
                                   note=f"alpha {res.alpha:.2f}")
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
