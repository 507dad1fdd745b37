"""Rotation of the residual stream (QuaRot, SpinQuant's fixed form): an orthogonal change of basis folded
into the weights, so the model computes the same function while activation outliers are spread out.

Found in the graph, never from model classes (the canonical graph, before any statistic is gathered):

- the **stream** starts at a token embedding (``embedding(ids, E)`` on a parameter, or its sum with a position
  embedding: GPT-2) and runs through casts, inactive dropouts and the residual adds ``h + y``, where ``y`` is
  a canonical linear's output (a **writer**: o_proj, down_proj, GPT-2's c_proj) used nowhere else;
- every other use of a stream value must be a norm whose output reaches only canonical linears (the
  **readers**: q/k/v, gate/up, c_attn, c_fc, the LM head): an **RMS norm** (``w * (x * rsqrt(mean(x^2) +
  eps))``, with casts) or a **LayerNorm** before the layer (GPT-2). A LayerNorm is not rotation-invariant
  (it subtracts the mean): the stream is centered first (the embeddings' rows and the writers' outputs less
  their mean, which no LayerNorm sees), and on a centered stream each LayerNorm is replaced by the bare RMS
  norm with its weight and bias folded into the readers (``b <- b + W beta``).

With an orthogonal ``Q`` (``qcompiler.core.hadamard.orthogonal``): ``E <- E Q``; each norm's weight ``g``
is folded into its readers and set to ones, and the readers read the rotated stream: ``W <- W diag(g) Q``
(``rms(x Q) = rms(x)``, so the norm commutes with ``Q`` once ``g`` is out); each writer writes it:
``W <- Q^T W``, ``b <- b Q``. ``online``: a writer whose input is not an attention's output (down_proj) reads
``x H`` (a normalized Hadamard matrix, applied as its Kronecker factors at run time) and ``W <- W H``.
Not done: the per-head rotation of the value and output projections. The value projection's output also
goes into the KV cache a graph returns, where its path to the attention is no longer visible, and every
graph that shares a cache (and the calibration graph, which has none) must rotate alike.

A tied LM head gets its own rotated copy (its norm's weight differs from the embedding's rows). Anything
else using the stream (a hidden state returned by the graph, a post-norm residual as in BERT, token type
embeddings) leaves the stream unrotated, and the report names the node found: with ``Rotation(fallback=True)``
(the default) every quantized linear's input is then rotated online instead (``passes/rotate_inputs.py``), with
``fallback=False`` the pass raises :class:`RotationError`.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field, replace

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
    same_tensor_info,
    tensor_digest,
)
from qcompiler.passes.rotate_inputs import online_transform, rotate_inputs, set_weight
from qcompiler.passes.smoothquant import _final_users, _keeps_channels, _reads_attention

_MUL = {operator.mul, torch.mul, torch.Tensor.mul}
_ADD = {operator.add, torch.add, torch.Tensor.add}
_EMBEDDING = {torch.nn.functional.embedding, torch.embedding}
_CASTS = {"to", "float", "type"}
_DROPOUT = {torch.nn.functional.dropout, torch.dropout}
_LAYER_NORM = {torch.nn.functional.layer_norm, torch.layer_norm}


class RotationError(QCompilerError):
    """The graph has no residual stream this pass can rotate (the message names what it found)."""


@dataclass
class Norm:
    mul: fx.Node  # RMS norm: the weight multiply; LayerNorm: the ``layer_norm`` call
    weight_index: int | None
    internal: set = field(default_factory=set)  # the norm's own nodes, from its input's casts to ``mul``
    readers: list = field(default_factory=list)
    kind: str = "rms"  # or "layer"


@dataclass
class Stream:
    embeddings: list[fx.Node]
    norms: list[Norm]
    writers: list[fx.Node]
    width: int


def _is_cast(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target in _CASTS


def _is_identity(node) -> bool:
    """A cast, or a dropout that does nothing (``training=False``): the stream's value passes through."""
    if _is_cast(node):
        return True
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target in _DROPOUT):
        return False
    training = node.args[2] if len(node.args) > 2 else node.kwargs.get("training", True)
    return training is False


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


def _layer_norm(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A ``layer_norm`` over the last dimension whose weight and bias are constants (or None)."""
    if not (node.op == "call_function" and node.target in _LAYER_NORM and len(node.args) >= 2):
        return False
    shape = node.args[1]
    affine = [node.args[i] if len(node.args) > i else node.kwargs.get(name) for i, name in ((2, "weight"), (3, "bias"))]
    return isinstance(shape, (tuple, list)) and len(shape) == 1 and all(
        a is None or constant_value(gm, a) is not None for a in affine)


def _norms(gm: fx.GraphModule) -> dict[fx.Node, list[Norm]]:
    """RMS norms and LayerNorms by the value they normalize."""
    out: dict[fx.Node, list[Norm]] = {}
    for node in gm.graph.nodes:
        if _layer_norm(gm, node):
            out.setdefault(node.args[0], []).append(Norm(node, None, {node}, kind="layer"))
            continue
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


def _writer(add: fx.Node, stream_value: fx.Node, width: int) -> fx.Node | None:
    other = next((a for a in add.args if a is not stream_value), None)
    node = other
    while isinstance(node, fx.Node) and LINEAR not in node.meta and (_keeps_channels(node) or _is_identity(node)) \
            and len(node.users) == 1:
        node = node.args[0]
    if isinstance(node, fx.Node) and LINEAR in node.meta and len(node.users) == 1 and \
            node.meta[LINEAR].out_features == width:
        return node
    return None


def _stream_start(gm: fx.GraphModule) -> tuple[list[fx.Node], fx.Node]:
    """The embeddings on parameters and the stream's first value: one token embedding, or the sum of a token
    and a position embedding (GPT-2)."""
    embeddings = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _EMBEDDING
                  and constant_value(gm, n.args[1]) is not None]
    if len(embeddings) == 1:
        return embeddings, embeddings[0]
    if len(embeddings) == 2:
        ends = []
        for e in embeddings:
            node = e
            while len(node.users) == 1 and _is_identity(next(iter(node.users))):
                node = next(iter(node.users))
            ends.append(node)
        users = [next(iter(n.users)) for n in ends if len(n.users) == 1]
        if len(users) == 2 and users[0] is users[1] and users[0].op == "call_function" and users[0].target in _ADD \
                and set(users[0].args) == set(ends):
            return embeddings, users[0]
    raise RotationError(f"rotation needs the residual stream to start at a token embedding on a parameter (or its "
                        f"sum with a position embedding); found {len(embeddings)} embeddings")


def find_stream(gm: fx.GraphModule) -> Stream:
    """The residual stream, its norms and writers; :class:`RotationError` naming what does not fit."""
    embeddings, start = _stream_start(gm)
    width = constant_value(gm, embeddings[0].args[1]).shape[1]
    norms_at = _norms(gm)
    internal = set().union(*(n.internal for ns in norms_at.values() for n in ns)) if norms_at else set()
    norms, writers, frontier, seen = [], [], [start], set()
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
            if _is_identity(user):
                frontier.append(user)  # the same value (a cast, an inactive dropout)
                continue
            if user.op == "call_function" and user.target in _ADD and len(user.args) == 2 and \
                    (writer := _writer(user, value, width)) is not None:
                writers.append(writer)
                frontier.append(user)
                continue
            raise RotationError(f"the residual stream value {value.name} is also used by {user.name} "
                                f"({user.op} {getattr(user.target, '__name__', user.target)}): rotation needs every "
                                "use to be a norm (RMS, or LayerNorm before the layer) or a residual add of a "
                                "linear's output")
    if len({n.kind for n in norms}) > 1:
        raise RotationError("the stream's norms are RMS norms and LayerNorms both: rotation takes one kind")
    for norm in norms:
        for node in norm.internal - {norm.mul}:
            if any(u not in norm.internal for u in node.users):
                raise RotationError(f"{node.name}, inside the RMS norm before {norm.mul.name}, is used elsewhere")
        norm.readers, others = _final_users(norm.mul, _keeps_last)
        if others or not norm.readers:
            raise RotationError(f"the norm {norm.mul.name} feeds {', '.join(o.name for o in others) or 'no linear'}: "
                                "rotation needs a norm's output to reach linears only")
        for reader in norm.readers:
            if reader.meta[LINEAR].in_features != width:
                raise RotationError(f"{reader.meta[LINEAR].module} reads {reader.meta[LINEAR].in_features} channels "
                                    f"of a {width}-wide stream")
    return Stream(embeddings, norms, writers, width)


def _value(gm: fx.GraphModule, node) -> torch.Tensor | None:
    """The constant ``node`` holds, detached (parameters may require grad outside inference mode)."""
    value = constant_value(gm, node)
    return None if value is None else value.detach()


def _fold_layer_norm(gm: fx.GraphModule, norm: Norm, q: torch.Tensor, tag: tuple) -> None:
    """On a centered stream a LayerNorm is an RMS norm with its weight and bias: fold both into the readers
    (``W <- W diag(g) Q``, ``b <- b + W beta``) and replace the LayerNorm by the bare RMS norm."""
    ln = norm.mul
    arg = lambda i, name, default: ln.args[i] if len(ln.args) > i else ln.kwargs.get(name, default)  # noqa: E731
    weight, bias, eps = arg(2, "weight", None), arg(3, "bias", None), arg(4, "eps", 1e-5)
    g = None if weight is None else _value(gm, weight).double()
    beta = None if bias is None else _value(gm, bias).double()
    for reader in norm.readers:
        w0 = linear_weight(gm, reader.args[1])[0].detach().double()
        w = w0 if g is None else w0 * g[None, :]
        set_weight(gm, reader, w @ q, tag + ("in", "layer_norm", tensor_digest(g if g is not None else q[0])))
        if beta is not None and bool(beta.ne(0).any()):
            _add_bias(gm, reader, w0 @ beta)
    graph = gm.graph
    x = ln.args[0]
    with graph.inserting_before(ln):
        square = graph.call_function(torch.mul, (x, x))
        mean = graph.call_method("mean", (square, -1), {"keepdim": True})
        inv = graph.call_function(torch.rsqrt, (graph.call_function(torch.add, (mean, eps)),))
        rms = same_tensor_info(graph.call_function(torch.mul, (x, inv)), ln)
    rms.meta["example_value"] = ln.meta.get("example_value")
    ln.replace_all_uses_with(rms)
    graph.erase_node(ln)


def _add_bias(gm: fx.GraphModule, linear: fx.Node, extra: torch.Tensor) -> None:
    """``linear``'s bias plus ``extra`` (a new bias where it had none)."""
    site = linear.meta[LINEAR]
    bias = bias_of(linear)
    dtype = linear_weight(gm, linear.args[1])[0].dtype
    if isinstance(bias, fx.Node):
        b = _value(gm, bias)
        replace_arg_with_tensor(gm, linear, 2, (b.double() + extra).to(b.dtype), f"{site.module}_b")
        return
    node = add_buffer(gm, f"{site.module}_b", extra.to(dtype).contiguous(), linear)
    linear.args = (linear.args[0], linear.args[1], node) + tuple(linear.args[3:])
    linear.meta[LINEAR] = replace(site, has_bias=True)


def rotate(gm: fx.GraphModule, config: Rotation) -> PassResult:
    """Rotate the residual stream of ``gm`` by ``config``'s orthogonal matrix (see the module docstring); where
    there is none this pass can rotate, each quantized linear's input online (``config.fallback``)."""
    try:
        stream = find_stream(gm)
    except RotationError as exc:
        if not config.fallback:
            raise
        return rotate_inputs(gm, str(exc))
    q, how = hadamard.orthogonal(stream.width, config.seed)
    tag = ("rotate", config.seed, tensor_digest(q))
    layer = any(n.kind == "layer" for n in stream.norms)  # LayerNorms: the stream is centered first

    def centered(t: torch.Tensor, dim: int) -> torch.Tensor:
        return t - t.mean(dim, keepdim=True) if layer else t

    for emb in stream.embeddings:
        e = _value(gm, emb.args[1])
        replace_arg_with_tensor(gm, emb, 1, (centered(e.double(), 1) @ q).to(e.dtype), "rotated_embedding")
    for norm in stream.norms:
        if norm.kind == "layer":
            _fold_layer_norm(gm, norm, q, tag)
            continue
        g = _value(gm, norm.mul.args[norm.weight_index]).double()
        for reader in norm.readers:
            w = linear_weight(gm, reader.args[1])[0].detach().double()
            set_weight(gm, reader, (w * g[None, :]) @ q, tag + ("in", tensor_digest(g)))
        replace_arg_with_tensor(gm, norm.mul, norm.weight_index,
                                torch.ones_like(_value(gm, norm.mul.args[norm.weight_index])), "folded_norm_w")
    online = []
    for writer in stream.writers:
        w = q.t() @ centered(linear_weight(gm, writer.args[1])[0].detach().double(), 0)
        step = tag + ("out",)
        n = writer.meta[LINEAR].in_features
        if config.online and _reads_attention(writer) is None and hadamard.factors(n) is not None:
            w = w @ (hadamard.hadamard(n) / n**0.5)
            step += ("online",)
            online_transform(gm, [writer], n)
            online.append(writer.meta[LINEAR].module)
        set_weight(gm, writer, w, step)
        bias = bias_of(writer)
        if isinstance(bias, fx.Node):
            b = _value(gm, bias)
            replace_arg_with_tensor(gm, writer, 2, (centered(b.double(), 0) @ q).to(b.dtype),
                                    f"{writer.meta[LINEAR].module}_b")
    gm.graph.lint()
    gm.recompile()
    readers = sum(len(n.readers) for n in stream.norms)
    kind = "LayerNorms (stream centered, each made an RMS norm)" if layer else "RMS norms"
    details = (f"residual stream of width {stream.width}: {how} (seed {config.seed}); {len(stream.norms)} {kind} "
               f"folded into {readers} readers, {len(stream.writers)} writers",
               f"online Hadamard on the inputs of {len(online)} layers" + (f" ({online[0]}, ...)" if online else ""))
    return PassResult(gm, modified=True, counts={"norms": len(stream.norms), "readers": readers,
                                                 "writers": len(stream.writers), "online": len(online)},
                      details=details)
