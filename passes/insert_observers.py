"""Insert an observer call on the input of every canonical linear (for calibration).

``observe_for(module_names)`` returns the callable that receives the input activation of those layers on
every run: the linears that read the same value (a block's q/k/v projections, its gate and up projections)
share one call, so that value is measured once. It is attached to the GraphModule as a submodule and
called from a ``call_module`` node placed before the first of them. The linears and every value in the
graph are unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx as fx

from qcompiler.core.ir import LINEAR, PassResult, fresh_name, plan_of


class ObserverCall(torch.nn.Module):
    def __init__(self, module_names: tuple[str, ...], fn: Callable[[torch.Tensor], None]) -> None:
        super().__init__()
        self.module_names = module_names
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.fn(x)
        return x


def insert_observers(gm: fx.GraphModule,
                     observe_for: Callable[[tuple[str, ...]], Callable[[torch.Tensor], None]]) -> PassResult:
    """Observe the input of every canonical linear the plan quantizes (the others stay unobserved), once per
    input value."""
    readers: dict[fx.Node, list[fx.Node]] = {}  # input value -> the quantized linears that read it, in order
    skipped = 0
    for node in gm.graph.nodes:
        site, plan = node.meta.get(LINEAR), plan_of(node)
        if site is None:
            continue
        if plan is None or not plan.quantized:
            skipped += 1
            continue
        readers.setdefault(node.args[0], []).append(node)
    for i, (value, linears) in enumerate(readers.items()):
        modules = tuple(linear.meta[LINEAR].module for linear in linears)
        name = fresh_name(gm, f"observer_{i}")
        gm.add_submodule(name, ObserverCall(modules, observe_for(modules)))
        with gm.graph.inserting_before(linears[0]):
            gm.graph.call_module(name, (value,))
    observed = sum(len(linears) for linears in readers.values())
    if readers:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, modified=bool(readers), counts={"observed": observed, "observer_calls": len(readers),
                                                          "skipped": skipped})
