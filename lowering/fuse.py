"""Turn QDQ linear patterns into ``qcompiler::`` kernel calls.

For each linear with ``meta["qcompiler.qlinear"]``: check the QDQ structure around it, look its key
up in :data:`~qcompiler.lowering.patterns.LOWERINGS`, pack the weight for the device's kernel,
trace the replacement in place of the pattern and drop the QDQ nodes (and weight buffers the kernel
no longer reads). The device is the weights' (``lower(gm, device=...)`` prepares for another, e.g.
CUDA graphs built from CPU tensors in tests); its variant of the lowering is used
(:meth:`~qcompiler.lowering.key.Lowering.for_device`). A key with no replacement keeps its QDQ
form (it runs on the reference quantize/dequantize ops) and is reported, never hidden; a layer the
device's kernel does not take is routed to a reference op by ``prepare`` and reported with why.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.fx as fx

from qcompiler.config import LayerScheme
from qcompiler.core.ir import DECISION, LOWERED_FROM, QLINEAR, PassResult, QLinearSpec, tensor_info
from qcompiler.core.storage import weight_bytes as stored_weight_bytes
from qcompiler.lowering import embedding
from qcompiler.lowering.key import REFERENCE_OPS, Layer, key_of, key_of_scheme
from qcompiler.lowering.patterns import LOWERINGS


def static_rows(x) -> int | None:
    """The number of rows (all dims but the last) of the activation node ``x`` when the graph fixes it
    (Dynamo's example value has only plain ints there), else None (a symbolic size)."""
    value = x.meta.get("example_value") if isinstance(x, fx.Node) else None
    shape = getattr(value, "shape", None)
    if shape is None or not all(isinstance(d, int) for d in shape[:-1]):
        return None
    return math.prod(shape[:-1])


def kernel_choice(scheme: LayerScheme, n: int, k: int, device: torch.device,
                  rows: int | None = None) -> tuple[str, str]:
    """``(kernel, why not the fast kernel or "")`` for an ``[n, k]`` layer quantized with ``scheme`` on
    ``device`` in a graph with ``rows`` rows of activations (None: symbolic): what :func:`lower` will
    pick (the plan records it before any weight is quantized)."""
    key = key_of_scheme(scheme)
    lowering = LOWERINGS.get(key)
    if lowering is None:
        return REFERENCE_OPS, f"no kernel for {key.describe()}"
    group = scheme.weight.group_size if scheme.weight.granularity == "per_group" else k
    return lowering.for_device(device).choose(Layer(n, k, group, rows, device))


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


def erase_dead(graph: fx.Graph, roots: list[fx.Node], erasable=None) -> None:
    """Erase ``roots`` and their inputs, transitively, as they become unused (only the nodes for which
    ``erasable(node)`` holds, when given)."""
    work = list(roots)
    while work:
        node = work.pop()
        if node._erased or node.users or node.op in ("placeholder", "output"):
            continue
        if erasable is not None and not erasable(node):
            continue
        work.extend(node.all_input_nodes)
        graph.erase_node(node)


def drop_unused_buffers(gm: fx.GraphModule, names: set[str]) -> None:
    """Delete buffers among ``names`` that no node reads any more (the int8 form of a weight repacked to 4
    bits, the weights stacked by ``fuse_gemv``)."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in names - used:
        if name in gm._buffers:
            del gm._buffers[name]


def _replace(gm: fx.GraphModule, node: fx.Node, spec: QLinearSpec, x: fx.Node, lowering, prepared) -> fx.Node:
    """Trace ``lowering.replace`` in place of the QDQ linear ``node``; returns the new output node."""
    graph = gm.graph
    example, out_value = tensor_info(x), tensor_info(node)
    bias = node.args[2] if len(node.args) > 2 else None
    tracer = fx.proxy.GraphAppendingTracer(graph)
    with graph.inserting_before(node):
        buffers = {kw: fx.Proxy(graph.get_attr(name), tracer) for kw, name in prepared.buffers.items()}
        out = lowering.replace(
            fx.Proxy(x, tracer),
            fx.Proxy(bias, tracer) if isinstance(bias, fx.Node) else bias,
            ndim=example.ndim,
            out_dtype=out_value.dtype if out_value is not None else example.dtype,
            **buffers, **prepared.constants,
        ).node
    out.meta[LOWERED_FROM] = spec
    old_inputs = list(node.all_input_nodes)
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    erase_dead(graph, old_inputs)
    return out


def _lower_one(gm: fx.GraphModule, node: fx.Node, spec: QLinearSpec, device: torch.device | None, storage: dict):
    """``(kernel, key or why not, decision)`` for one QDQ linear, replaced by its kernel where one applies
    (``kernel`` is :data:`REFERENCE_OPS` exactly when it is not); ``storage[spec.w_q]`` is set to
    ``(spec, prepared)`` when it is."""
    key = key_of(spec)
    lowering = LOWERINGS.get(key)
    if lowering is None:
        return REFERENCE_OPS, f"no kernel for {key.describe()}", None
    x = _match(node, spec)
    if isinstance(x, str):
        return REFERENCE_OPS, x, None
    if tensor_info(x) is None:
        return REFERENCE_OPS, "input shape unknown", None
    layer_device = device or gm.get_buffer(spec.w_q).device
    lowering = lowering.for_device(layer_device)
    n, k = gm.get_buffer(spec.w_q).shape
    group = spec.group_size if spec.weight_granularity == "per_group" else k
    prepared = lowering.prepare(gm, spec, Layer(n, k, group, static_rows(x), layer_device))
    if isinstance(prepared, str):
        return REFERENCE_OPS, prepared, None
    decision = node.meta.get(DECISION)
    if prepared.stored_bytes is not None and decision is not None:
        extra = decision.weight_bytes - _quantized_bytes(gm, spec)  # float columns kept beside, if any
        decision = dataclasses.replace(decision, kernel_bytes=prepared.stored_bytes + extra)
    else:
        decision = None
    out = _replace(gm, node, spec, x, lowering, prepared)
    storage[spec.w_q] = (spec, prepared)
    if decision is not None:
        out.meta[DECISION] = decision
    return prepared.kernel, key.describe(), decision


def lower(gm: fx.GraphModule, device: torch.device | None = None) -> PassResult:
    """Details per quantized layer: ``(module, kernel, key or why not, decision)``, where ``decision``
    is the layer's :class:`~qcompiler.core.ir.LayerDecision` with the bytes of the kernel's weight format
    when the lowering repacked the weight (None otherwise); quantized embedding tables follow the linears
    (``lowering/embedding.py``). ``device``: the device whose kernels to
    use (default: each layer's weight's)."""
    details, lowered = [], 0
    replaced_buffers: set[str] = set()
    storage: dict = {}
    for node in list(gm.graph.nodes):
        spec: QLinearSpec | None = node.meta.get(QLINEAR)
        if spec is None:
            continue
        kernel, why, decision = _lower_one(gm, node, spec, device, storage)
        details.append((spec.module, kernel, why, decision))
        if kernel != REFERENCE_OPS:
            replaced_buffers.update(n for n in (spec.w_q, spec.w_scale, spec.w_zero_point) if n)
            lowered += 1
    tables = embedding.lower_embeddings(gm, storage)
    details.extend(tables)
    lowered += sum(1 for _, _, why, _ in tables if not why)
    if lowered:
        gm.graph.lint()
        drop_unused_buffers(gm, replaced_buffers)
        gm.recompile()
    counts = {"lowered": lowered, "not_lowered": len(details) - lowered}
    return PassResult(gm, modified=lowered > 0, counts=counts, details=tuple(details))


def _quantized_bytes(gm: fx.GraphModule, spec: QLinearSpec) -> int:
    zero = gm.get_buffer(spec.w_zero_point) if spec.w_zero_point else None
    return stored_weight_bytes(gm.get_buffer(spec.w_q), gm.get_buffer(spec.w_scale), zero, spec.weight_bits)
