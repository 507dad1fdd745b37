"""Online Hadamard transforms on linear inputs: the down projections' of a rotated residual stream
(``passes/rotate.py``), and every quantized linear's where the graph has no residual stream that pass can rotate
(a post-norm encoder such as BERT or MiniLM, whose LayerNorm output is both the stream and the next layer's
input): :func:`rotate_inputs`, the rotation's fallback.

A linear reading ``x`` then reads ``x H`` (``H`` a Hadamard matrix of its width, normalized, applied as its
Kronecker factors at run time) and its weight's columns are multiplied by ``H``: ``(x H)(W H)^T = x W^T``, the
same function in exact arithmetic, while an activation outlier channel is spread over all channels before the
input is quantized. Linears reading the same value (q, k and v) share one transform. A width with no Hadamard
matrix built here (``qcompiler.core.hadamard``) stays unrotated, and the pass counts and names it.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from qcompiler.core import hadamard
from qcompiler.core.ir import LINEAR, ONLINE_HADAMARD, PLAN, PassResult, linear_weight
from qcompiler.passes.graph_utils import add_buffer, replace_linear_weight, same_tensor_info


def set_weight(gm: fx.GraphModule, linear: fx.Node, new: torch.Tensor, tag: tuple) -> None:
    """``linear``'s weight replaced by ``new`` (in the weight's dtype); ``tag`` extends its derivation key."""
    weight, _, _ = linear_weight(gm, linear.args[1])
    replace_linear_weight(gm, linear, new.to(weight.dtype), tag)


def online_transform(gm: fx.GraphModule, readers: list[fx.Node], n: int) -> None:
    """``readers`` (linears on one input ``x`` of width ``n``) read ``x H`` (normalized Hadamard of order
    ``n``, as its Kronecker factors) instead of ``x``; their weights are not changed here."""
    a, b = hadamard.kron_parts(n)
    first = readers[0]
    x = first.args[0]
    dtype = x.meta["example_value"].dtype if isinstance(x.meta.get("example_value"), torch.Tensor) else torch.float32
    module = first.meta[LINEAR].module
    b_n = add_buffer(gm, f"{module}_hadamard_b", b.to(dtype), first)
    a_n = add_buffer(gm, f"{module}_hadamard_a", a.to(dtype), first) if a.shape[0] > 1 else None
    graph = gm.graph
    # x H = A^T X B for X the [m, p] view of x: each product a single GEMM over all rows (a 2-D right factor),
    # the A one on the transposed blocks (A^T V = (V^T A)^T)
    with graph.inserting_before(first):
        if a_n is None:
            flat = graph.call_function(torch.matmul, (x, b_n))
        else:
            blocks = graph.call_method("unflatten", (x, -1, (a.shape[0], b.shape[0])))
            right = graph.call_function(torch.matmul, (blocks, b_n))
            left = graph.call_function(torch.matmul, (graph.call_method("transpose", (right, -1, -2)), a_n))
            flat = graph.call_method("flatten", (graph.call_method("transpose", (left, -1, -2)), -2))
        same_tensor_info(flat, x)
    flat.meta["example_value"] = x.meta.get("example_value")
    flat.meta[ONLINE_HADAMARD] = (None if a_n is None else a_n.target, b_n.target)  # lowering/hadamard.py
    for reader in readers:
        reader.update_arg(0, flat)


def rotate_inputs(gm: fx.GraphModule, why: str) -> PassResult:
    """Every linear the plan quantizes reads its input through an online Hadamard transform (shared by the
    linears on one input), ``H`` folded into its weight's columns. ``why``: why the residual stream was not
    rotated instead (the report says it)."""
    groups: dict[tuple[fx.Node, int], list[fx.Node]] = {}
    no_matrix = []
    for node in gm.graph.nodes:
        plan = node.meta.get(PLAN)
        if LINEAR not in node.meta or plan is None or not plan.quantized:
            continue
        n = node.meta[LINEAR].in_features
        if hadamard.factors(n) is None:
            no_matrix.append(node.meta[LINEAR].module)
            continue
        groups.setdefault((node.args[0], n), []).append(node)  # in graph order: the first reader comes first
    for (_, n), readers in groups.items():
        h = hadamard.hadamard(n) / n**0.5
        for reader in readers:
            w = linear_weight(gm, reader.args[1])[0].detach().double()
            set_weight(gm, reader, w @ h, ("rotate_inputs", n))
        online_transform(gm, readers, n)
    gm.graph.lint()
    gm.recompile()
    rotated = sum(len(r) for r in groups.values())
    details = (f"residual stream not rotated: {why}",
               f"online Hadamard on the inputs of {rotated} quantized linears instead ({len(groups)} transforms, "
               "one per distinct input)"
               + (f"; {len(no_matrix)} of widths with no Hadamard matrix here left unrotated ({no_matrix[0]}, ...)"
                  if no_matrix else ""))
    return PassResult(gm, modified=bool(groups), counts={"norms": 0, "readers": 0, "writers": 0, "online": rotated,
                                                          "unrotated": len(no_matrix)}, details=details)
