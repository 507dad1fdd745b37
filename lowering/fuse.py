"""Turn QDQ linear patterns into ``qcompiler::`` kernel calls.

For each linear with ``meta["qcompiler.qlinear"]``: check the QDQ structure around it, look its key
up in :data:`~qcompiler.lowering.patterns.REPLACEMENTS`, pack the weight for the device's kernel,
trace the replacement in place of the pattern and drop the QDQ nodes. A key with no replacement keeps
its QDQ form (it runs on the reference quantize/dequantize ops) and is reported, never hidden.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from qcompiler.ir import QLINEAR, PassResult, QLinearSpec, tensor_info
from qcompiler.lowering import ops
from qcompiler.lowering.patterns import REPLACEMENTS, key_of

_DEQUANTIZE = torch.ops.qcompiler.dequantize.default
_QUANTIZE = torch.ops.qcompiler.quantize.default


def _is_call(node, target) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is target


def _match(node: fx.Node, spec: QLinearSpec):
    """The float input ``x`` of a QDQ linear, or a string saying why the structure is not the expected one."""
    x_dq, w_dq = node.args[0], node.args[1]
    if not (_is_call(w_dq, _DEQUANTIZE) and w_dq.args[0].op == "get_attr" and w_dq.args[0].target == spec.w_q):
        return "its weight is not dequantize(w_q) of its own buffer"
    if spec.activation is None:
        return x_dq
    if not (_is_call(x_dq, _DEQUANTIZE) and _is_call(x_dq.args[0], _QUANTIZE)):
        return "its input is not dequantize(quantize(x))"
    return x_dq.args[0].args[0]


def _erase_dead(graph: fx.Graph, roots: list[fx.Node]) -> None:
    """Erase ``roots`` and their inputs, transitively, as they become unused."""
    work = list(roots)
    while work:
        node = work.pop()
        if node._erased or node.users or node.op in ("placeholder", "output"):
            continue
        work.extend(node.all_input_nodes)
        graph.erase_node(node)


def lower(gm: fx.GraphModule) -> PassResult:
    graph = gm.graph
    details, lowered = [], 0
    for node in list(graph.nodes):
        spec: QLinearSpec | None = node.meta.get(QLINEAR)
        if spec is None:
            continue
        key = key_of(spec)
        replacement = REPLACEMENTS.get(key)
        if replacement is None:
            details.append((spec.module, "reference quantize/dequantize ops", f"no kernel for {key.describe()}"))
            continue
        x = _match(node, spec)
        if isinstance(x, str):
            details.append((spec.module, "reference quantize/dequantize ops", x))
            continue
        example = tensor_info(x)
        if example is None:
            details.append((spec.module, "reference quantize/dequantize ops", "input shape unknown"))
            continue
        w_q, w_scale = gm.get_buffer(spec.w_q), gm.get_buffer(spec.w_scale)
        handle = ops.prepare_weight(w_q, w_scale)
        bias = node.args[2] if len(node.args) > 2 else None
        out_value = tensor_info(node)
        tracer = fx.proxy.GraphAppendingTracer(graph)
        with graph.inserting_before(node):
            w_q_node = graph.get_attr(spec.w_q)
            w_scale_node = graph.get_attr(spec.w_scale)
            static = {}
            if spec.x_scale is not None:
                # the static zero point is a constant of the kernel call; the scale stays a buffer
                zp = gm.get_buffer(spec.x_zero_point) if spec.x_zero_point else None
                static = dict(x_scale=fx.Proxy(graph.get_attr(spec.x_scale), tracer),
                              x_zero_point=None if zp is None else int(zp.flatten()[0]),
                              symmetric=spec.activation_symmetric)
            out = replacement(
                fx.Proxy(x, tracer), fx.Proxy(w_q_node, tracer), fx.Proxy(w_scale_node, tracer),
                fx.Proxy(bias, tracer) if isinstance(bias, fx.Node) else bias,
                handle=handle, ndim=example.ndim,
                out_dtype=out_value.dtype if out_value is not None else example.dtype,
                **static,
            )
        out.node.meta["qcompiler.lowered_from"] = spec
        old_inputs = list(node.all_input_nodes)
        node.replace_all_uses_with(out.node)
        graph.erase_node(node)
        _erase_dead(graph, old_inputs)
        details.append((spec.module, ops.kernel_for(w_q.device), key.describe()))
        lowered += 1
    if lowered:
        graph.lint()
        gm.recompile()
    counts = {"lowered": lowered, "not_lowered": len(details) - lowered}
    return PassResult(gm, modified=lowered > 0, counts=counts, details=tuple(details))
