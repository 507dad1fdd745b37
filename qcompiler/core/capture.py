"""Capturing a model as the backend sees it, calling it on a batch, and naming the graph's weights.

Dynamo lifts module parameters into graph placeholders. The example input at a placeholder's position
is the real parameter tensor; the placeholder's source (``L['self']._modules['layers']._modules['0']
._parameters['weight']``) gives its name. :func:`bind_parameters` records both in
``node.meta["qcompiler.param"]`` so that passes can find a weight's values without the model object.

:func:`capture` is the one way to get that graph outside the backend (calibration's GPTQ/AWQ
rounding, the numeric debugger, artifacts, export, tests), and :func:`call` the one way to run a model
on a batch: a tensor of input ids, a dict of keyword inputs, a tuple of positional tensors, or a
:class:`Batch` of both.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from qcompiler.core.errors import QCompilerError
from qcompiler.core.ir import PARAM_META, ParamInfo

_SOURCE_PART = re.compile(r"_(modules|parameters|buffers)\['([^']+)'\]")
_ROOT = re.compile(r"^(L|G)\[[^\]]*\](\[\d+\])?\.?")


_PLACEHOLDER_ATTR = re.compile(r"_(parameters|buffers)_(.+?)_?$")


def name_from_placeholder(placeholder: str) -> str | None:
    """``l_args_0_modules_model_modules_norm_parameters_weight_`` -> ``model.norm.weight``: the name
    Dynamo gives a lifted parameter's placeholder when it records no source (a module passed as an
    argument). None when it is not such a name (or a module's name holds ``_modules_`` itself)."""
    parts = placeholder.split("_modules_")
    if len(parts) < 2:
        return None
    last = _PLACEHOLDER_ATTR.search(parts[-1])
    if last is None:
        return None
    return ".".join([*parts[1:-1], parts[-1][: last.start()], last.group(2)])


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
        # without a source (a module passed as an argument, ``capture``), the name is read from the placeholder's
        name = qualified_name(source) if source else name_from_placeholder(node.name)
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


def concrete_inputs(example_inputs) -> list:
    """``example_inputs`` with every symbolic size replaced by the value it has in this call.

    When Dynamo recompiles a frame with dynamic shapes (a second sequence length), the sizes it
    passes are ``torch.SymInt``; running the graph eagerly (to dump per-node errors) needs plain
    ints. The original list still goes to Inductor.
    """
    from torch.fx.experimental.symbolic_shapes import optimization_hint

    return [optimization_hint(x) if isinstance(x, torch.SymInt) else x for x in example_inputs]


# --- calling a model on a batch --------------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    """Positional and keyword inputs of one model call."""

    args: tuple = ()
    kwargs: Mapping = field(default_factory=dict)


def accepts(model: torch.nn.Module, name: str) -> bool:
    """Whether ``model.forward`` takes a keyword argument ``name``."""
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def as_batch(batch, use_cache_off: bool = False) -> Batch:
    """``batch`` as a :class:`Batch`; ``use_cache_off`` adds ``use_cache=False`` unless it is given
    (a causal LM then returns no KV cache: calibration and capture want the logits only)."""
    if isinstance(batch, Batch):
        out = batch
    elif isinstance(batch, torch.Tensor):
        out = Batch((batch,))
    elif isinstance(batch, Mapping):
        out = Batch((), dict(batch))
    elif isinstance(batch, (tuple, list)) and all(isinstance(b, torch.Tensor) for b in batch):
        out = Batch(tuple(batch))
    else:
        raise QCompilerError(
            f"a batch of type {type(batch).__name__} is not supported: give input-id tensors, dicts of model "
            "keyword inputs, or tuples of positional input tensors"
        )
    return with_default(out, "use_cache", False) if use_cache_off else out


def with_default(batch: Batch, name: str, value) -> Batch:
    """``batch`` with the keyword input ``name=value`` unless it gives ``name`` itself."""
    return batch if name in batch.kwargs else Batch(batch.args, {**batch.kwargs, name: value})


def call(model, batch: Batch):
    return model(*batch.args, **batch.kwargs)


def batch_tokens(batch: Batch) -> int:
    """Elements of the batch's first tensor (its tokens, for input ids)."""
    first = next((v for v in (*batch.args, *batch.kwargs.values()) if isinstance(v, torch.Tensor)), None)
    return 0 if first is None else first.numel()


# --- capture ---------------------------------------------------------------------------------------


class _Recorded(Exception):
    """Raised by the recording backend instead of running the graph."""


def capture(model: torch.nn.Module, batches: list, *, prepare: Callable | None = None, fullgraph: bool = False,
            what: str = "this") -> tuple[fx.GraphModule, list[list]]:
    """The one FX graph Dynamo captures for ``model`` on ``batches`` (all of one shape), with its
    parameters bound, and the graph's input values for each batch. The model is not run.

    ``prepare(gm, example_inputs)`` runs on the graph at capture time (after binding). Raises
    :class:`QCompilerError` naming ``what`` needs one graph when Dynamo makes several (graph breaks,
    batches of different shapes) or none.
    """
    graphs: list[tuple[fx.GraphModule, list]] = []

    def backend(gm, example_inputs, **_):
        bind_parameters(gm, example_inputs)
        if prepare is not None:
            prepare(gm, example_inputs)
        calls: list = []
        graphs.append((gm, calls))

        def record(*args):
            calls.append(list(args))
            raise _Recorded

        return record

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=fullgraph)
    try:
        with torch.inference_mode():
            for batch in batches:
                try:
                    call(compiled, batch)
                except _Recorded:
                    continue
                raise QCompilerError(f"{what} needs the model captured as one graph: it ran without reaching one")
    finally:
        torch._dynamo.reset()
    if len(graphs) != 1:
        raise QCompilerError(
            f"{what} needs the model captured as one graph for batches of one shape; Dynamo made {len(graphs)} "
            "(graph breaks, or batches of different shapes)"
        )
    return graphs[0]
