"""Each layer alone quantized, without running the whole graph each time: the float graph is run once,
node by node, and at each layer's first quantize/dequantize node its live values are handed to a run of
the rest of the graph with that layer quantized. Only the nodes the output needs run (the other layers'
idle quantize/dequantize nodes are skipped). On SmolLM2 this costs on average half a forward per layer
instead of a whole one; the outputs equal a full run of the same graph (tested through the search's
sensitivities against compiling each layer alone).

A graph holding an in-place op (a method or torch function whose name ends in ``_``, ``+=``, ``x[i] = v``)
could change a value the float run still holds, so such a graph is run whole for every layer instead.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence

import torch
from torch import fx

_OPERATOR_IN_PLACE = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
                      operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift,
                      operator.imatmul, operator.setitem}


def _in_place(node: fx.Node) -> bool:
    """A tensor method or torch function named ``*_`` (``add_``), an in-place operator (``+=``), or ``x[i] = v``."""
    if node.op == "call_method":
        return isinstance(node.target, str) and node.target.endswith("_") and not node.target.endswith("__")
    if node.op != "call_function":
        return False
    if node.target in _OPERATOR_IN_PLACE:
        return True
    if getattr(node.target, "__module__", "") in ("_operator", "operator"):
        return False  # operator.and_ is a plain bitwise and
    name = getattr(node.target, "__name__", "")
    return name.endswith("_") and not name.endswith("__")


class Replay:
    """``run_each(toggles, modules, on_output)``: for every module, set its toggles quantized, run the
    graph on ``inputs`` from its cut, hand the output to ``on_output(module, output)``, set them back."""

    def __init__(self, gm: fx.GraphModule, inputs: Sequence) -> None:
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.output = next(n for n in self.nodes if n.op == "output")
        self.values = dict(zip([n for n in self.nodes if n.op == "placeholder"], inputs))
        self.whole = any(_in_place(n) for n in self.nodes)

    def _needed(self) -> set[fx.Node]:
        seen, work = {self.output}, [self.output]
        while work:
            for n in work.pop().all_input_nodes:
                if n not in seen:
                    seen.add(n)
                    work.append(n)
        return seen

    def _execute(self, node: fx.Node, env: dict):
        if node.op == "placeholder":
            return self.values[node]
        if node.op == "get_attr":
            return operator.attrgetter(node.target)(self.gm)
        args = fx.node.map_arg(node.args, lambda n: env[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "call_module":
            return self.gm.get_submodule(node.target)(*args, **kwargs)
        return args[0]  # output

    def _run(self, env: dict, start: int, needed: set[fx.Node]):
        """Run the needed nodes from ``start`` on, freeing each value after its last needed user."""
        last = {}
        for n in needed:
            for user in n.users:
                if user in needed:
                    last[n] = max(last.get(n, -1), self.index[user])
        for i in range(start, len(self.nodes)):
            node = self.nodes[i]
            if node not in needed:
                continue
            env[node] = self._execute(node, env)
            for n in node.all_input_nodes:
                if last.get(n) == i and n.op != "placeholder":
                    env.pop(n, None)
        return env[self.output]

    def run_each(self, toggles: dict, modules: list[str], set_quantized: Callable[[list, bool], None],
                 on_output: Callable[[str, object], None]) -> None:
        floats = self._needed()
        plans = []
        for module in modules:
            if module not in toggles:
                continue
            set_quantized(toggles[module], True)
            needed = self._needed()
            extra = needed - floats
            first = min((self.index[n] for n in extra), default=min(self.index[e[0]] for e in toggles[module]))
            set_quantized(toggles[module], False)
            plans.append((0 if self.whole else first, module, needed))
        plans.sort(key=lambda p: p[0])
        env, pos = {}, 0
        last = {n: max((self.index[u] for u in n.users), default=-1) for n in floats}
        with torch.inference_mode():
            for cut, module, needed in plans:
                while pos < cut:  # the float run, up to this layer's cut
                    node = self.nodes[pos]
                    if node in floats:
                        env[node] = self._execute(node, env)
                        for n in node.all_input_nodes:
                            if last.get(n, -1) <= pos and n.op != "placeholder":
                                env.pop(n, None)
                    pos += 1
                set_quantized(toggles[module], True)
                try:
                    out = self._run(dict(env), cut, needed)
                finally:
                    set_quantized(toggles[module], False)
                on_output(module, out)
