"""One GEMV for the decode-step linear layers that read the same input: q/k/v, gate/up.

After :func:`qcompiler.lowering.fuse.lower`, a decode step calls one C++ GEMV per linear layer (SmolLM2:
7 per block, 210 per step), each with its own copy of the input's quantization (the graph quantizes the
input once per layer). Layers that read the same input with the same activation scheme compute from the
same integers, so their weights are stacked along the output channels into one buffer and called once;
each layer's output is a slice of the stacked output, and everything after the GEMV (the per-token scale,
the bias) is unchanged. Exact: every output element is the same dot product of the same integers.

Fewer calls cost less (each call is a dispatcher call from Inductor's wrapper, an allocation and a
wake-up of the threads) and a stacked weight is large enough to be split over the threads (SmolLM2's
192 x 576 key and value projections alone run on one thread).

Which calls share an input is read from the graph: the activation argument of each call must be the same
node or computed the same way (the same pure operations, with the same constants, from the same nodes;
:func:`signature`), the other non-weight arguments equal, the weights buffers with the same input width.
"""

from __future__ import annotations

import builtins
import operator
from collections import defaultdict

import torch
import torch.fx as fx

from qcompiler.core.ir import PassResult
from qcompiler.lowering.fuse import drop_unused_buffers, erase_dead
from qcompiler.lowering.kernels import reference

_OPS = {  # kernel -> (positions of its activation/constant arguments, positions of its weight buffers)
    "int8_gemv": ((0, 1), (2, 3, 4)),  # x_q, x_zero_point | w_q [N, K], w_rowsum [N], w_scale [N]
    "int8_weight_gemv": ((0,), (1, 2)),  # x | w_q [N, K], w_scale [N]
    "int4_gemv": ((0, 4), (1, 2, 3)),  # x, group | w_packed [N, K / 2], scale [N, G], zero [N, G]
    "int4_gemv_tiled": ((0, 4), (1, 2, 3)),  # x, group | w_tiled [N / 32, 16 K], scale/zero [N / 32, G, 32]
}
_ROWS_PER_ENTRY = {"int4_gemv_tiled": reference.INT4_TILE}  # output channels per entry of a weight buffer's dim 0

# operations that compute a value from their inputs and nothing else: the quantization of an activation is
# built from these (anything else, e.g. an in-place update of a KV cache, is compared by identity)
_PURE_METHODS = frozenset({
    "abs", "add", "amax", "amin", "clamp", "clamp_max", "clamp_min", "contiguous", "detach", "div", "expand", "float",
    "max", "mean", "min", "mul", "neg", "permute", "pow", "reshape", "round", "rsqrt", "size", "sqrt", "squeeze",
    "sub", "sum", "to", "transpose", "type_as", "unsqueeze", "view",
})
_PURE_FUNCTIONS = frozenset({
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.neg, operator.getitem,
    operator.pow, builtins.getattr, torch.abs, torch.maximum, torch.minimum, torch.round, torch.clamp,
    torch.clamp_min, torch.zeros_like, torch.ones_like, torch.amax, torch.amin, torch.reshape, torch.where,
    torch.div, torch.mul, torch.add, torch.sub, torch.neg, torch.sqrt, torch.rsqrt, torch.floor, torch.ceil,
    torch.trunc, torch.sign,
})


def _is_pure(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _PURE_METHODS
    if node.op != "call_function":
        return False
    if node.target in _PURE_FUNCTIONS:
        return True
    return node.target in (torch.ops.qcompiler.quantize.default, torch.ops.qcompiler.choose_qparams.default)


class _Signatures:
    """:meth:`of` a node: how it is computed, as a small int, equal for two nodes that compute the same value
    (the same pure operations on the same constants and the same other nodes). Hash-consed: a value's
    signature is built from its inputs' numbers, so a deep graph costs one step per node."""

    def __init__(self) -> None:
        self.memo: dict[fx.Node, int] = {}
        self.ids: dict[object, int] = {}
        self.roots: dict[fx.Node, frozenset[fx.Node]] = {}

    def _intern(self, key) -> int:
        return self.ids.setdefault(key, len(self.ids))

    def of_arg(self, value):
        if isinstance(value, fx.Node):
            return ("node", self.of(value))
        if isinstance(value, (tuple, list)):
            return (type(value).__name__, tuple(self.of_arg(v) for v in value))
        if isinstance(value, dict):
            return ("dict", tuple(sorted((k, self.of_arg(v)) for k, v in value.items())))
        return ("const", type(value).__name__, repr(value))

    def of(self, node: fx.Node) -> int:
        work = [node]
        while work:  # inputs first, without recursion (a model is thousands of nodes deep)
            current = work[-1]
            if current in self.memo:
                work.pop()
                continue
            pending = [a for a in current.all_input_nodes if a not in self.memo] if _is_pure(current) else []
            if pending:
                work.extend(pending)
                continue
            work.pop()
            if _is_pure(current):
                key = (current.op, current.target, self.of_arg(tuple(current.args)), self.of_arg(dict(current.kwargs)))
                self.roots[current] = frozenset().union(*(self.roots[a] for a in current.all_input_nodes))
            else:
                key = ("node", id(current))
                self.roots[current] = frozenset({current})
            self.memo[current] = self._intern(key)
        return self.memo[node]


def _mutated(node: fx.Node) -> bool:
    """Whether any user of ``node`` may change it in place (then two reads of it need not agree)."""
    for user in node.users:
        if user.op == "call_method" and str(user.target).endswith("_"):
            return True
        if user.op == "call_function":
            schema = getattr(user.target, "_schema", None)
            if schema is not None and schema.is_mutable or getattr(user.target, "__name__", "").endswith("_"):
                return True
    return False


def _kernel(node: fx.Node) -> str | None:
    """The name of the GEMV kernel ``node`` calls (``torch.ops.qcompiler.X`` or ``.X.default``), else None."""
    if node.op != "call_function":
        return None
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        target = target.overloadpacket
    if not isinstance(target, torch._ops.OpOverloadPacket):
        return None
    namespace, _, name = target._qualified_op_name.partition("::")
    return name if namespace == "qcompiler" and name in _OPS else None


def _buffers(gm: fx.GraphModule, node: fx.Node, positions) -> list[torch.Tensor] | None:
    args = [node.args[i] for i in positions]
    if not all(isinstance(a, fx.Node) and a.op == "get_attr" for a in args):
        return None
    return [gm.get_buffer(a.target) for a in args]


def fuse_gemv(gm: fx.GraphModule) -> PassResult:
    """Stack the weights of GEMV calls that share their input (see the module docstring)."""
    signatures = _Signatures()
    groups: dict[tuple, list[fx.Node]] = defaultdict(list)
    for node in gm.graph.nodes:
        kind = _kernel(node)
        if kind is None:
            continue
        inputs, weights = _OPS[kind]
        if len(node.args) != len(inputs) + len(weights) or node.kwargs:
            continue
        buffers = _buffers(gm, node, weights)
        if buffers is None:
            continue
        key = (kind, tuple(signatures.of_arg(node.args[i]) for i in inputs), buffers[0].shape[1], buffers[0].dtype,
               tuple((b.dtype, b.shape[1:]) for b in buffers[1:]))
        groups[key].append(node)
    fused = calls = 0
    replaced: set[str] = set()
    for (kind, *_), members in groups.items():
        roots = set().union(*(signatures.roots.get(m.args[0], {m.args[0]}) for m in members))
        if len(members) < 2 or any(_mutated(r) for r in roots):
            continue
        replaced.update(m.args[i].target for m in members for i in _OPS[kind][1])
        _stack(gm, kind, members, fused)
        fused += 1
        calls += len(members)
    if fused:
        drop_unused_buffers(gm, replaced)
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, modified=fused > 0, counts={"stacked_gemv_calls": fused, "gemv_calls_stacked": calls})


def _stack(gm: fx.GraphModule, kind: str, members: list[fx.Node], index: int) -> None:
    """Replace ``members`` (in graph order) by one call on their stacked weights and a slice per member."""
    graph = gm.graph
    inputs, weights = _OPS[kind]
    stacked = [torch.cat([gm.get_buffer(m.args[i].target) for m in members]) for i in weights]
    names = []
    for position, tensor in zip(weights, stacked, strict=True):
        name = f"qc_stacked_{index}_{kind}_{position}"
        gm.register_buffer(name, tensor.contiguous())
        names.append(name)
    first = members[0]
    with graph.inserting_before(first):
        attrs = [graph.get_attr(name) for name in names]
        args = [None] * (len(inputs) + len(weights))
        for i in inputs:
            args[i] = first.args[i]
        for i, attr in zip(weights, attrs, strict=True):
            args[i] = attr
        call = graph.call_function(first.target, tuple(args))
    call.meta = {k: v for k, v in first.meta.items() if k != "example_value"}
    start = 0
    for member in members:
        width = gm.get_buffer(member.args[weights[0]].target).shape[0] * _ROWS_PER_ENTRY.get(kind, 1)
        with graph.inserting_before(member):
            part = graph.call_function(operator.getitem, (call, (Ellipsis, slice(start, start + width))))
            part = graph.call_method("contiguous", (part,))  # a view of the stacked output when there is one row
        part.meta = dict(member.meta)
        member.replace_all_uses_with(part)
        dropped = list(member.all_input_nodes)
        graph.erase_node(member)
        # the member's own input quantization and buffer reads; an in-place update that nothing reads is
        # kept (it is done for its effect)
        erase_dead(graph, dropped, erasable=lambda node: _is_pure(node) or node.op == "get_attr")
        start += width
