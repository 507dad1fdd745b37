"""Rewrite every linear-like op against a parameter into one form: ``torch._C._nn.linear(x, w, b)``.

Matched (``P`` a 2-D parameter placeholder, possibly behind ``t`` / ``transpose`` / ``permute`` / ``.T``):

- ``F.linear(x, P, b)``                          -> annotated as is
- ``torch.addmm(b, x, P)`` (HF GPT-2 Conv1D)     -> ``linear(x, t(P), b)``
- ``x @ P``, ``torch.matmul(x, P)``, ``torch.mm`` -> ``linear(x, t(P))``; ``x @ P.T`` -> ``linear(x, P)``

The function is unchanged (tested in float64). Each canonical node gets ``meta["qcompiler.linear"]``
(a :class:`~qcompiler.core.ir.LinearSite`).

A matrix product or convolution on a module parameter that does not fit that form (``P @ x``, a 3-D
weight, ``addmm`` with ``alpha``/``beta``, ``bmm``/``einsum``/``conv`` on a parameter, an integer weight)
stays as it is, in float, and comes back in ``details`` as a :class:`~qcompiler.core.ir.LayerDecision`
with the reason, so the backend's report lists it.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from qcompiler.core import capture
from qcompiler.core.ir import LINEAR, PARAM_META, LayerDecision, LinearSite, PassResult

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


def _is_transpose_node(node: fx.Node) -> bool:
    return (
        (node.op == "call_function" and node.target in _TRANSPOSE_FUNCTIONS and _is_2d_transpose(node))
        or (node.op == "call_method" and node.target in _TRANSPOSE_METHODS and _is_2d_transpose(node))
        or (node.op == "call_function" and node.target is getattr and node.args[1] in ("T", "mT"))
    )


def resolve_weight(node) -> tuple[fx.Node, bool] | None:
    """``(param_placeholder, transposed)`` if ``node`` is a 2-D float parameter or its transpose."""
    transposed = False
    while isinstance(node, fx.Node):
        if node.op == "placeholder":
            info = node.meta.get(PARAM_META)
            if info is None or info.tensor.dim() != 2 or not info.tensor.is_floating_point():
                return None
            return node, transposed
        if not _is_transpose_node(node):
            return None
        transposed = not transposed
        node = node.args[0]
    return None


def _is_1d(node) -> bool:
    if not isinstance(node, fx.Node):
        return False
    info = node.meta.get(PARAM_META)
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


# Ops that compute with a weight like a linear layer does; on a parameter that canonicalize cannot
# rewrite they are reported as kept in float (embedding lookups are left out: not quantized by design).
_PRODUCT_FUNCTIONS = {
    torch.bmm: "bmm", torch.baddbmm: "baddbmm", torch.einsum: "einsum", torch.addmm: "addmm",
    torch.nn.functional.conv1d: "conv1d", torch.nn.functional.conv2d: "conv2d", torch.nn.functional.conv3d: "conv3d",
    torch.nn.functional.conv_transpose1d: "conv_transpose1d", torch.nn.functional.conv_transpose2d: "conv_transpose2d",
    torch.conv1d: "conv1d", torch.conv2d: "conv2d", torch.conv3d: "conv3d", LINEAR_TARGET: "linear",
    torch.Tensor.bmm: "bmm", **{f: "matmul" for f in _MATMUL_FUNCTIONS},
}
_PRODUCT_METHODS = {"bmm": "bmm", "baddbmm": "baddbmm", "addmm": "addmm", **{m: "matmul" for m in _MATMUL_METHODS}}
_VIEW_METHODS = {"t", "transpose", "permute", "view", "reshape", "contiguous", "to", "unsqueeze", "squeeze",
                 "expand", "float", "half", "bfloat16"}
_VIEW_FUNCTIONS = {torch.t, torch.transpose, torch.permute, torch.reshape, torch.unsqueeze, torch.squeeze,
                   torch.Tensor.t, torch.Tensor.view, torch.Tensor.reshape}


def _parameter_behind(node) -> fx.Node | None:
    """The parameter placeholder ``node`` is a view/transpose/cast of, if any."""
    while isinstance(node, fx.Node):
        if node.op == "placeholder":
            info = node.meta.get(PARAM_META)
            return node if info is not None and info.is_parameter else None
        is_view = (
            (node.op == "call_method" and node.target in _VIEW_METHODS)
            or (node.op == "call_function" and node.target in _VIEW_FUNCTIONS)
            or (node.op == "call_function" and node.target is getattr and node.args[1] in ("T", "mT"))
        )
        if not is_view or not node.args:
            return None
        node = node.args[0]
    return None


def _through_view(arg, param: fx.Node) -> bool:
    """True when ``arg`` reaches ``param`` through an op other than a 2-D transpose (a view or a cast)."""
    while isinstance(arg, fx.Node) and arg is not param:
        if not _is_transpose_node(arg):
            return True
        arg = arg.args[0]
    return False


def _why_not_linear(node: fx.Node, op: str, param: fx.Node) -> str:
    tensor = param.meta[PARAM_META].tensor
    weight_arg = node.args[1] if op in ("linear", "matmul") and len(node.args) > 1 else None
    if _parameter_behind(weight_arg) is param and _through_view(weight_arg, param):
        return (f"the weight reaches {op} through a view or cast (e.g. .to(dtype), .view, .reshape) of a "
                f"{tensor.dim()}-D {str(tensor.dtype).removeprefix('torch.')} parameter: only a parameter or its "
                "transpose is quantized")
    if not tensor.is_floating_point():
        return f"{op} on a {tensor.dtype} parameter: only float weights are quantized"
    if op in ("linear", "matmul", "addmm") and tensor.dim() != 2:
        return f"{op} on a {tensor.dim()}-D parameter {tuple(tensor.shape)}: only 2-D weights are quantized"
    if op == "addmm":
        return "addmm with alpha/beta other than 1 or a bias that is not 1-D: not a linear layer"
    if op in ("linear", "matmul"):
        return f"{op} with the parameter as the left operand (P @ x): only x @ W forms are linear layers"
    return f"{op} on a parameter has no quantized form in qcompiler (linear layers only)"


def _unhandled_products(graph: fx.Graph) -> list[LayerDecision]:
    """Products/convolutions on parameters that canonicalize left alone, as float decisions."""
    decisions = []
    for node in graph.nodes:
        if LINEAR in node.meta:
            continue
        if node.op == "call_function":
            op = _PRODUCT_FUNCTIONS.get(node.target)
        elif node.op == "call_method":
            op = _PRODUCT_METHODS.get(node.target)
        else:
            op = None
        if op is None:
            continue
        args = list(node.args) + list(node.kwargs.values())
        args = [a for arg in args for a in (arg if isinstance(arg, (list, tuple)) else (arg,))]
        params = [p for p in (_parameter_behind(arg) for arg in args) if p is not None]
        if not params:
            continue
        # the weight, not a bias: the first parameter with two or more dims if there is one
        param = next((p for p in params if p.meta[PARAM_META].tensor.dim() >= 2), params[0])
        info = param.meta[PARAM_META]
        nbytes = info.tensor.numel() * info.tensor.element_size()
        decisions.append(LayerDecision(
            module=f"{_site_module(node, info.name)} [{op}]", quantized=False, param=info.name,
            reason=_why_not_linear(node, op, param), bits_per_weight=8.0 * info.tensor.element_size(),
            weight_bytes=nbytes, float_weight_bytes=nbytes,
        ))
    return decisions


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
        tensor = param_node.meta[PARAM_META].tensor
        out_features, in_features = tensor.shape[::-1] if param_is_in_out else tensor.shape
        site = LinearSite(
            module=_site_module(node, param_node.meta[PARAM_META].name),
            weight_param=param_node.meta[PARAM_META].name,
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
    unhandled = _unhandled_products(graph)
    counts["kept_float"] = len(unhandled)
    return PassResult(gm, modified=rewritten > 0, counts=counts, details=tuple(unhandled))
