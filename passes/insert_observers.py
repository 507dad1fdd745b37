"""Insert an observer call on the input of every canonical linear (for calibration).

``observe_for(module_name)`` returns the callable that receives that layer's input activation on
every run; it is attached to the GraphModule as a submodule and called from a ``call_module`` node
placed before the linear. The linear itself and every value in the graph are unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx as fx

from qcompiler.core.ir import LINEAR, PassResult, fresh_name, plan_of


class ObserverCall(torch.nn.Module):
    def __init__(self, module_name: str, fn: Callable[[torch.Tensor], None]) -> None:
        super().__init__()
        self.module_name = module_name
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.fn(x)
        return x


def insert_observers(gm: fx.GraphModule, observe_for: Callable[[str], Callable[[torch.Tensor], None]]) -> PassResult:
    """Observe the input of every canonical linear the plan quantizes (the others stay unobserved)."""
    inserted, skipped = 0, 0
    for node in list(gm.graph.nodes):
        site, plan = node.meta.get(LINEAR), plan_of(node)
        if site is None:
            continue
        if plan is None or not plan.quantized:
            skipped += 1
            continue
        name = fresh_name(gm, f"observer_{inserted}")
        gm.add_submodule(name, ObserverCall(site.module, observe_for(site.module)))
        with gm.graph.inserting_before(node):
            gm.graph.call_module(name, (node.args[0],))
        inserted += 1
    if inserted:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, modified=inserted > 0, counts={"observed": inserted, "skipped": skipped})
