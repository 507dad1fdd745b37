"""Rotation of the residual stream (QuaRot, SpinQuant's fixed form): an orthogonal change of basis folded
into the weights, so the model computes the same function while activation outliers are spread out.

Found in the graph, never from model classes (the canonical graph, before any statistic is gathered):

- the **stream** starts at a token embedding (``embedding(ids, E)`` on a parameter) and runs through the
  residual adds ``h + y``, where ``y`` is a canonical linear's output (a **writer**: o_proj, down_proj)
  used nowhere else;
- every other use of a stream value must be an **RMS norm** (``w * (x * rsqrt(mean(x^2) + eps))``, with
  casts) whose output reaches only canonical linears (the **readers**: q/k/v, gate/up, the LM head).

With an orthogonal ``Q`` (``qcompiler.core.hadamard.orthogonal``): ``E <- E Q``; each norm's weight ``g``
is folded into its readers and set to ones, and the readers read the rotated stream: ``W <- W diag(g) Q``
(``rms(x Q) = rms(x)``, so the norm commutes with ``Q`` once ``g`` is out); each writer writes it:
``W <- Q^T W``, ``b <- b Q``. ``online``: a writer whose input is not an attention's output (down_proj) reads
``x H`` (a normalized Hadamard matrix, applied as its Kronecker factors at run time) and ``W <- W H``.
Not done: the per-head rotation of the value and output projections. The value projection's output also
goes into the KV cache a graph returns, where its path to the attention is no longer visible, and every
graph that shares a cache (and the calibration graph, which has none) must rotate alike.

A tied LM head gets its own rotated copy (its norm's weight differs from the embedding's rows). Anything
else using the stream (a hidden state returned by the graph, a LayerNorm, a second embedding added to the
first) makes the pass refuse with the node it found: rotation is then not applied.
"""

from __future__ import annotations

import hashlib
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from qcompiler.config import Rotation
from qcompiler.core import hadamard
from qcompiler.core.errors import QCompilerError
from qcompiler.core.ir import LINEAR, PassResult, linear_weight
from qcompiler.passes.graph_utils import (
    add_buffer,
    bias_of,
    constant_value,
    replace_arg_with_tensor,
    replace_linear_weight,
    same_tensor_info,
)
from qcompiler.passes.smoothquant import _keeps_channels, _reads_attention

_MUL = {operator.mul, torch.mul, torch.Tensor.mul}
_ADD = {operator.add, torch.add, torch.Tensor.add}
_EMBEDDING = {torch.nn.functional.embedding, torch.embedding}
_CASTS = {"to", "float", "type"}


class RotationError(QCompilerError):
    """The graph has no residual stream this pass can rotate (the message names what it found)."""


@dataclass
class Norm:
    mul: fx.Node  # the weight multiply
    weight_index: int
    internal: set = field(default_factory=set)  # the norm's own nodes, from its input's casts to ``mul``
    readers: list = field(default_factory=list)


@dataclass
class Stream:
    embeddings: list[fx.Node]
    norms: list[Norm]
    writers: list[fx.Node]
    width: int


def _is_cast(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target in _CASTS


def _skip_casts_back(node):
    while _is_cast(node):
        node = node.args[0]
    return node


def _is(node, method: str, functions=()) -> bool:
    return isinstance(node, fx.Node) and ((node.op == "call_method" and node.target == method)
                                          or (node.op == "call_function" and node.target in functions))


def _rms_input(h: fx.Node, internal: set) -> fx.Node | None:
    """The value ``h`` is the RMS-normalized form of (casts skipped), adding the norm's nodes to ``internal``."""
    while _is_cast(h):
        internal.add(h)
        h = h.args[0]
    if not (isinstance(h, fx.Node) and h.op == "call_function" and h.target in _MUL and len(h.args) == 2):
        return None
    for x, r in (h.args, h.args[::-1]):
        if not _is(r, "rsqrt", (torch.rsqrt,)):
            continue
        total = r.args[0]
        if not (isinstance(total, fx.Node) and total.op == "call_function" and total.target in _ADD):
            continue
        mean = next((a for a in total.args if _is(a, "mean", (torch.mean,))), None)
        power = mean.args[0] if mean is not None else None
        if not (_is(power, "pow", (torch.pow,)) and power.args[1] == 2 and power.args[0] is x):
            continue
        internal.update({h, r, total, mean, power})
        while _is_cast(x):
            internal.add(x)
            x = x.args[0]
        return x
    return None


def _norms(gm: fx.GraphModule) -> dict[fx.Node, list[Norm]]:
    """RMS norms by the value they normalize."""
    out: dict[fx.Node, list[Norm]] = {}
    for node in gm.graph.nodes:
        if not (node.op == "call_function" and node.target in _MUL and len(node.args) == 2):
            continue
        for i, arg in enumerate(node.args):
            w = constant_value(gm, arg)
            if w is None or w.dim() != 1 or not w.is_floating_point():
                continue
            internal: set = set()
            x = _rms_input(node.args[1 - i], internal)
            if x is not None:
                out.setdefault(x, []).append(Norm(node, i, internal | {node}))
            break
    return out


def _keeps_last(node: fx.Node) -> bool:
    """A view or cast keeping the channel dimension, or an index that takes all of it (``h[:, rows, :]``)."""
    if _keeps_channels(node):
        return True
    index = node.args[1] if node.op == "call_function" and node.target is operator.getitem else None
    return isinstance(index, tuple) and len(index) >= 2 and index[-1] == slice(None, None, None) and \
        Ellipsis not in index


def _readers(norm: fx.Node) -> tuple[list[fx.Node], list[fx.Node]]:
    """Linears reading ``norm``'s output as their input through :func:`_keeps_last` nodes, and other users."""
    linears, others, frontier = [], [], [norm]
    while frontier:
        current = frontier.pop()
        for user in current.users:
            if LINEAR in user.meta and user.args[0] is current:
                linears.append(user)
            elif _keeps_last(user):
                frontier.append(user)
            else:
                others.append(user)
    return linears, others


def _writer(add: fx.Node, stream_value: fx.Node, width: int) -> fx.Node | None:
    other = next((a for a in add.args if a is not stream_value), None)
    node = other
    while isinstance(node, fx.Node) and LINEAR not in node.meta and _keeps_channels(node) and len(node.users) == 1:
        node = node.args[0]
    if isinstance(node, fx.Node) and LINEAR in node.meta and len(node.users) == 1 and \
            node.meta[LINEAR].out_features == width:
        return node
    return None


def find_stream(gm: fx.GraphModule) -> Stream:
    """The residual stream, its norms and writers; :class:`RotationError` naming what does not fit."""
    embeddings = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _EMBEDDING
                  and constant_value(gm, n.args[1]) is not None]
    if len(embeddings) != 1:
        raise RotationError(f"rotation needs one token embedding on a parameter starting the residual stream; "
                            f"found {len(embeddings)}")
    width = constant_value(gm, embeddings[0].args[1]).shape[1]
    norms_at = _norms(gm)
    internal = set().union(*(n.internal for ns in norms_at.values() for n in ns)) if norms_at else set()
    norms, writers, frontier, seen = [], [], [embeddings[0]], set()
    while frontier:
        value = frontier.pop()
        if value in seen:
            continue
        seen.add(value)
        found = norms_at.get(value, [])
        norms.extend(found)
        for user in value.users:
            if user in internal and any(user in n.internal for n in found):
                continue
            if user.op == "call_function" and user.target in _ADD and len(user.args) == 2 and \
                    (writer := _writer(user, value, width)) is not None:
                writers.append(writer)
                frontier.append(user)
                continue
            raise RotationError(f"the residual stream value {value.name} is also used by {user.name} "
                                f"({user.op} {getattr(user.target, '__name__', user.target)}): rotation needs every "
                                "use to be an RMS norm or a residual add of a linear's output")
    for norm in norms:
        for node in norm.internal - {norm.mul}:
            if any(u not in norm.internal for u in node.users):
                raise RotationError(f"{node.name}, inside the RMS norm before {norm.mul.name}, is used elsewhere")
        norm.readers, others = _readers(norm.mul)
        if others or not norm.readers:
            raise RotationError(f"the norm {norm.mul.name} feeds {', '.join(o.name for o in others) or 'no linear'}: "
                                "rotation needs a norm's output to reach linears only")
        for reader in norm.readers:
            if reader.meta[LINEAR].in_features != width:
                raise RotationError(f"{reader.meta[LINEAR].module} reads {reader.meta[LINEAR].in_features} channels "
                                    f"of a {width}-wide stream")
    return Stream(embeddings, norms, writers, width)


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.to(torch.float32).contiguous().numpy().tobytes()).hexdigest()[:16]


def _set_weight(gm: fx.GraphModule, linear: fx.Node, new: torch.Tensor, tag: tuple) -> None:
    weight, _, _ = linear_weight(gm, linear.args[1])
    replace_linear_weight(gm, linear, new.to(weight.dtype), tag)


def _online(gm: fx.GraphModule, writer: fx.Node, n: int) -> None:
    """``writer`` reads ``x H`` (normalized Hadamard of order ``n``, as its Kronecker factors) instead of ``x``."""
    a, b = hadamard.kron_parts(n)
    x = writer.args[0]
    dtype = x.meta["example_value"].dtype if isinstance(x.meta.get("example_value"), torch.Tensor) else torch.float32
    module = writer.meta[LINEAR].module
    a_t = add_buffer(gm, f"{module}_hadamard_a", a.t().contiguous().to(dtype), writer)
    b_n = add_buffer(gm, f"{module}_hadamard_b", b.to(dtype), writer)
    graph = gm.graph
    with graph.inserting_before(writer):
        blocks = graph.call_method("unflatten", (x, -1, (a.shape[0], b.shape[0])))
        right = graph.call_function(torch.matmul, (blocks, b_n))
        left = graph.call_function(torch.matmul, (a_t, right))
        flat = same_tensor_info(graph.call_method("flatten", (left, -2)), x)
    flat.meta["example_value"] = x.meta.get("example_value")
    writer.update_arg(0, flat)


def rotate(gm: fx.GraphModule, config: Rotation) -> PassResult:
    """Rotate the residual stream of ``gm`` by ``config``'s orthogonal matrix (see the module docstring)."""
    stream = find_stream(gm)
    q, how = hadamard.orthogonal(stream.width, config.seed)
    tag = ("rotate", config.seed, _digest(q))
    for emb in stream.embeddings:
        e = constant_value(gm, emb.args[1])
        replace_arg_with_tensor(gm, emb, 1, (e.double() @ q).to(e.dtype), "rotated_embedding")
    for norm in stream.norms:
        g = constant_value(gm, norm.mul.args[norm.weight_index]).double()
        for reader in norm.readers:
            w = linear_weight(gm, reader.args[1])[0].detach().double()
            _set_weight(gm, reader, (w * g[None, :]) @ q, tag + ("in", _digest(g)))
        replace_arg_with_tensor(gm, norm.mul, norm.weight_index,
                                torch.ones_like(constant_value(gm, norm.mul.args[norm.weight_index])), "folded_norm_w")
    online = []
    for writer in stream.writers:
        w = q.t() @ linear_weight(gm, writer.args[1])[0].detach().double()
        step = tag + ("out",)
        n = writer.meta[LINEAR].in_features
        if config.online and _reads_attention(writer) is None and hadamard.factors(n) is not None:
            w = w @ (hadamard.hadamard(n) / n**0.5)
            step += ("online",)
            _online(gm, writer, n)
            online.append(writer.meta[LINEAR].module)
        _set_weight(gm, writer, w, step)
        bias = bias_of(writer)
        if isinstance(bias, fx.Node):
            b = constant_value(gm, bias)
            replace_arg_with_tensor(gm, writer, 2, (b.double() @ q).to(b.dtype), f"{writer.meta[LINEAR].module}_b")
    gm.graph.lint()
    gm.recompile()
    readers = sum(len(n.readers) for n in stream.norms)
    details = (f"residual stream of width {stream.width}: {how} (seed {config.seed}); {len(stream.norms)} norms "
               f"folded into {readers} readers, {len(stream.writers)} writers",
               f"online Hadamard on the inputs of {len(online)} layers" + (f" ({online[0]}, ...)" if online else ""))
    return PassResult(gm, modified=True, counts={"norms": len(stream.norms), "readers": readers,
                                                 "writers": len(stream.writers), "online": len(online)},
                      details=details)
