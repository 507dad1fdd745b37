"""Per-layer decode-step times for the search's latency budget (``AutoPrecision.max_latency_ratio``).

Each distinct layer shape (out, in features, bias) is timed once per candidate on this machine: a graph
holding that one linear layer, captured on one token (the decode step's shape), taken through the
backend's passes and lowering for the candidate (every lowered kernel and the activation's quantization
included; float: ``F.linear``), and called directly, all candidates interleaved (medians,
``qcompiler.tools.timing.time_interleaved``). A layer's latency is its shape's time; the budget compares
the chosen layers' summed time with the same layers' float time.
"""

from __future__ import annotations

import sys
from dataclasses import replace

import torch
from torch import fx

from qcompiler import pipeline
from qcompiler.config.auto import AutoPrecision, Candidate, uniform_recipe
from qcompiler.core import capture
from qcompiler.core.ir import LINEAR
from qcompiler.report import CompileReport
from qcompiler.tools.timing import machine_name, time_interleaved


def layer_shapes(gm: fx.GraphModule, modules: list[str]) -> dict[str, tuple[int, int, bool]]:
    """``module -> (out_features, in_features, has_bias)`` of the searched layers of a canonical graph."""
    out = {}
    for node in gm.graph.nodes:
        site = node.meta.get(LINEAR)
        if site is not None and site.module in modules:
            out.setdefault(site.module, (site.out_features, site.in_features, bool(site.has_bias)))
    return out


def _one_layer(shape, auto: AutoPrecision, candidate, device: torch.device):
    n, k, bias = shape
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(k, n, bias=bias)).eval()
    x = torch.randn(1, 1, k)
    recipe = uniform_recipe(auto, candidate)
    if candidate.weight is not None:  # the one layer is quantized whatever its name; the kernels do not
        recipe = replace(recipe, skip=(), rounding=None if recipe.data_driven_rounding else recipe.rounding)  # see GPTQ/AWQ
    gm, calls = capture.capture(layer, [capture.as_batch(x)], what="the latency search")
    capture.bind_parameters(gm, calls[0])
    gm = pipeline.run(gm, pipeline.build(recipe, device), CompileReport(0, candidate.name, "fast"))
    inputs = calls[0]
    return lambda: gm(*inputs)


FLOAT = Candidate("float")


def candidate_latencies(gm0: fx.GraphModule, auto: AutoPrecision, modules: list[str], device: torch.device,
                        repeats: int = 30, progress: bool = True
                        ) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """``(candidate -> module -> seconds, module -> float seconds)``: each searched layer's decode step on this
    machine on every candidate, and in float (the budget's reference)."""
    shapes = layer_shapes(gm0, modules)
    distinct = sorted(set(shapes.values()))
    if progress:
        print(f"timing {len(distinct)} layer shapes x {len(auto.candidates)} candidates on {machine_name()} ...",
              file=sys.stderr)
    timed = {c.name: c for c in auto.candidates if c.weight is not None}
    per_shape: dict[str, dict[tuple, float]] = {name: {} for name in (*timed, FLOAT.name)}
    with torch.inference_mode():
        for shape in distinct:
            fns = {name: _one_layer(shape, auto, c, device) for name, c in {**timed, FLOAT.name: FLOAT}.items()}
            for name, t in time_interleaved(fns, repeats, device).items():
                per_shape[name][shape] = t
    out = {c.name: {m: per_shape[c.name if c.weight is not None else FLOAT.name][shapes[m]] for m in modules}
           for c in auto.candidates}
    return out, {m: per_shape[FLOAT.name][shapes[m]] for m in modules}
