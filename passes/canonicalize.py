"""Rewrite every linear-like op against a parameter into one form: ``torch._C._nn.linear(x, w, b)``.

Matched (``P`` a 2-D parameter placeholder, possibly behind ``t`` / ``transpose`` / ``permute`` / ``.T``):

- ``F.linear(x, P, b)``                          -> annotated as is
- ``torch.addmm(b, x, P)`` (HF GPT-2 Conv1D)     -> ``linear(x, t(P), b)``
- ``x @ P``, ``torch.matmul(x, P)``, ``torch.mm`` -> ``linear(x, t(P))``; ``x @ P.T`` -> ``linear(x, P)``

The function is unchanged (tested in float64). Each canonical node gets ``meta["qcompiler.linear"]``
(a :class:`~qcompiler.ir.LinearSite`).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from qcompiler import capture
from qcompiler.ir import LINEAR, LinearSite, PassResult

LINEAR_TARGET = torch._C._nn.linear

_MATMUL_FUNCTIONS = {torch.matmul, operator.matmul, torch.mm, torch.Tensor.matmul, torch.Tensor.mm}
_MATMUL_METHODS = {"matmul", "mm", "__matmul__"}
_TRANSPOSE_FUNCTIONS = {torch.t, torch.transpose, torch.permute, torch.Tensor.t}
_TRANSPOSE_METHODS = {"t", "transpose", "permute"}


def _is_2d_transpose(node: fx.Node) -> bool:
    """True when ``node`` swaps the two dims of a 2-D tensor."""
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    args = node.args[1:]
    if name == "t":
        return True
    if name == "transpose":
        return sorted(int(a) % 2 for a in args) == [0, 1] if len(args) == 2 else False
    if name == "permute":
        dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
        return [int(d) % 2 for d in dims] == [1, 0]
    return False


def resolve_weight(node) -> tuple[fx.Node, bool] | None:
    """``(param_placeholder, transposed)`` if ``node`` is a 2-D float parameter or its transpose."""
    transposed = False
    while isinstance(node, fx.Node):
        if node.op == "placeholder":
            info = node.meta.get(capture.PARAM_META)
            if info is None or info.tensor.dim() != 2 or not info.tensor.is_floating_point():
                return None
            return node, transposed
        is_transpose = (
            (node.op == "call_function" and node.target in _TRANSPOSE_FUNCTIONS and _is_2d_transpose(node))
            or (node.op == "call_method" and node.target in _TRANSPOSE_METHODS and _is_2d_transpose(node))
            or (node.op == "call_function" and node.target is getattr and node.args[1] in ("T", "mT"))
        )
        if not is_transpose:
            return None
        transposed = not transposed
        node = node.args[0]
    return None


def _is_1d(node) -> bool:
    if not isinstance(node, fx.Node):
        return False
    info = node.meta.get(capture.PARAM_META)
    if info is not None:
        return info.tensor.dim() == 1
    value = node.meta.get("example_value")
    return isinstance(value, torch.Tensor) and value.dim() == 1


def _match(node: fx.Node):
    """``(x, weight_arg, bias, source_op)`` in linear's convention, or None."""
    if node.op == "call_function" and node.target is LINEAR_TARGET:
        x, w = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        return x, w, bias, "linear", False
    if node.op == "call_function" and node.target is torch.addmm:
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1 or len(node.args) != 3:
            return None
        bias, x, w = node.args
        if not _is_1d(bias):
            return None
        return x, w, bias, "addmm", True
    is_matmul = (node.op == "call_function" and node.target in _MATMUL_FUNCTIONS) or (
        node.op == "call_method" and node.target in _MATMUL_METHODS
    )
    if is_matmul and len(node.args) == 2 and not node.kwargs:
        x, w = node.args
        return x, w, None, "matmul", True
    return None


def _is_canonical_weight(w_arg: fx.Node, param_node: fx.Node, param_is_in_out: bool) -> bool:
    if not param_is_in_out:
        return w_arg is param_node
    return w_arg.op == "call_function" and w_arg.target is torch.t and w_arg.args[0] is param_node


def _erase_dead_transposes(graph: fx.Graph, node: fx.Node) -> None:
    """Remove the transpose chain that fed a rewritten op, once nothing else uses it."""
    while node.op != "placeholder" and not node.users:
        parent = node.args[0]
        graph.erase_node(node)
        node = parent


def _site_module(node: fx.Node, param_name: str) -> str:
    name = capture.module_name(node)
    if name:
        return name
    return param_name.rsplit(".", 1)[0] if "." in param_name else param_name


def canonicalize(gm: fx.GraphModule) -> PassResult:
    graph = gm.graph
    counts = {"linear": 0, "addmm": 0, "matmul": 0}
    rewritten = 0
    for node in list(graph.nodes):
        matched = _match(node)
        if matched is None:
            continue
        x, w_arg, bias, source_op, weight_is_in_out = matched
        resolved = resolve_weight(w_arg)
        if resolved is None:
            continue
        param_node, transposed = resolved
        # linear wants [out, in]; the matched op holds the weight [in, out] when weight_is_in_out.
        param_is_in_out = transposed != weight_is_in_out
        tensor = param_node.meta[capture.PARAM_META].tensor
        out_features, in_features = tensor.shape[::-1] if param_is_in_out else tensor.shape
        site = LinearSite(
            module=_site_module(node, param_node.meta[capture.PARAM_META].name),
            weight_param=param_node.meta[capture.PARAM_META].name,
            transposed=param_is_in_out,
            in_features=int(in_features),
            out_features=int(out_features),
            has_bias=bias is not None,
            source_op=source_op,
        )
        counts[source_op] += 1
        if source_op == "linear" and _is_canonical_weight(w_arg, param_node, param_is_in_out):
            node.meta[LINEAR] = site
            continue
        with graph.inserting_before(node):
            weight = graph.call_function(torch.t, (param_node,)) if param_is_in_out else param_node
            new = graph.call_function(LINEAR_TARGET, (x, weight, bias))
        new.meta.update({k: v for k, v in node.meta.items() if k != LINEAR})
        new.meta[LINEAR] = site
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        _erase_dead_transposes(graph, w_arg)
        rewritten += 1
    if rewritten:
        graph.lint()
        gm.recompile()
    counts["rewritten"] = rewritten
    return PassResult(gm, modified=rewritten > 0, counts=counts)
