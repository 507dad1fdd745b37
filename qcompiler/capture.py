"""From a Dynamo FX graph to named weights.

Dynamo lifts module parameters into graph placeholders. The example input at a placeholder's position
is the real parameter tensor; the placeholder's source (``L['self']._modules['layers']._modules['0']
._parameters['weight']``) gives its name. :func:`bind_parameters` records both in
``node.meta["qcompiler.param"]`` so that passes can find a weight's values without the model object.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.fx as fx

PARAM_META = "qcompiler.param"

_SOURCE_PART = re.compile(r"_(modules|parameters|buffers)\['([^']+)'\]")
_ROOT = re.compile(r"^(L|G)\[[^\]]*\](\[\d+\])?\.?")


@dataclass(frozen=True, eq=False)
class ParamInfo:
    """A parameter or buffer that Dynamo lifted into a placeholder."""

    name: str  # fully qualified, e.g. "model.layers.0.self_attn.q_proj.weight"
    tensor: torch.Tensor
    is_parameter: bool


def _source_name(node: fx.Node) -> str | None:
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    return source.name if source is not None and hasattr(source, "name") else None


def qualified_name(source_name: str) -> str | None:
    """``L['self']._modules['fc']._parameters['weight']`` -> ``fc.weight`` (None if not a module attr)."""
    parts = _SOURCE_PART.findall(source_name)
    if not parts or parts[-1][0] == "modules":
        return None
    return ".".join(name for _, name in parts)


def bind_parameters(gm: fx.GraphModule, example_inputs: list) -> dict[str, ParamInfo]:
    """Annotate placeholders that hold module parameters/buffers; return them by placeholder name."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    bound: dict[str, ParamInfo] = {}
    for node, value in zip(placeholders, example_inputs):
        if not isinstance(value, torch.Tensor):
            continue
        source = _source_name(node)
        name = qualified_name(source) if source else None
        is_param = isinstance(value, torch.nn.Parameter)
        if name is None and not is_param:
            continue  # a user input, not a weight
        info = ParamInfo(name=name or node.name, tensor=value, is_parameter=is_param)
        node.meta[PARAM_META] = info
        bound[node.name] = info
    return bound


def module_name(node: fx.Node) -> str | None:
    """Name of the innermost module that a node was traced in (``model.layers.0.mlp.up_proj``)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, _ = list(stack.values())[-1]
    return _ROOT.sub("", path) or None


def strip_root(path: str) -> str:
    return _ROOT.sub("", path)


def concrete_inputs(example_inputs) -> list:
    """``example_inputs`` with every symbolic size replaced by the value it has in this call.

    When Dynamo recompiles a frame with dynamic shapes (a second sequence length), the sizes it
    passes are ``torch.SymInt``; running the graph eagerly (to dump per-node errors) needs plain
    ints. The original list still goes to Inductor.
    """
    from torch.fx.experimental.symbolic_shapes import optimization_hint

    return [optimization_hint(x) if isinstance(x, torch.SymInt) else x for x in example_inputs]
