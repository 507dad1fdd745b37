"""A rotated model's online Hadamard transform (``passes/rotate.py``: a down projection reads ``x @ kron(A, B)``)
as one C++ call for few rows: ``qcompiler::kron_hadamard`` (``kernels/cpu_hadamard.cpp``).

The rotation pass writes the transform as graph ops (a view of each row as ``[m, p]``, ``X B``, ``A^T (X B)``,
the views back): exact, and fast for a prompt, where each product is one GEMM over all rows. In a decode step
the two GEMMs are a few thousand multiplies each and the time is their dispatch (about 18 us per layer on a
2-core Zen 4, 0.5 ms of SmolLM2's step); the C++ op does both in one call.

Rewritten where the graph fixes the row count at most :data:`~qcompiler.lowering.key.GEMV_MAX_ROWS` (the
decode step's shapes; the same rule as the GEMV kernels), the input is float32 on the CPU and the C++ kernels
are built; elsewhere the graph ops stay (the count says how many were rewritten).
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx

from qcompiler.core.ir import ONLINE_HADAMARD, PassResult
from qcompiler.lowering.fuse import erase_dead
from qcompiler.lowering.kernels import native
from qcompiler.lowering.key import GEMV_MAX_ROWS


def _input(flat: fx.Node, a_name: str | None, b_name: str) -> fx.Node | None:
    """The transform's input ``x``, read back through the ops ``rotate._online`` made (None if they changed)."""

    def matmul_by(node, name):
        return (isinstance(node, fx.Node) and node.target is torch.matmul and len(node.args) == 2
                and getattr(node.args[1], "target", None) == name)

    if a_name is None:  # x @ B
        return flat.args[0] if matmul_by(flat, b_name) else None
    try:
        left = flat.args[0].args[0]  # flatten(transpose(left))
        right = left.args[0].args[0]  # left = matmul(transpose(right), A)
        blocks = right.args[0]  # right = matmul(blocks, B)
    except (AttributeError, IndexError):
        return None
    if flat.target != "flatten" or not matmul_by(left, a_name) or not matmul_by(right, b_name):
        return None
    return blocks.args[0] if blocks.target == "unflatten" else None


def _few_float_rows(x: fx.Node) -> bool:
    value = x.meta.get("example_value")
    if not isinstance(value, torch.Tensor) or value.dtype != torch.float32 or value.device.type != "cpu":
        return False
    lead = value.shape[:-1]
    return all(isinstance(d, int) for d in lead) and math.prod(lead) <= GEMV_MAX_ROWS


def online_hadamard(gm: fx.GraphModule) -> PassResult:
    """Replace each tagged online Hadamard transform on few float32 CPU rows by ``qcompiler::kron_hadamard``."""
    if native.unavailable_reason() is not None:
        return PassResult(gm, modified=False, counts={"online_hadamard": 0})
    rewritten = 0
    graph = gm.graph
    for node in list(graph.nodes):
        tag = node.meta.get(ONLINE_HADAMARD)
        if tag is None or node.op == "placeholder":
            continue
        a_name, b_name = tag
        x = _input(node, a_name, b_name)
        if x is None or not _few_float_rows(x):
            continue
        with graph.inserting_before(node):
            a = graph.get_attr(a_name) if a_name is not None else None
            new = graph.call_function(torch.ops.qcompiler.kron_hadamard.default, (x, a, graph.get_attr(b_name)))
        new.meta = {k: v for k, v in node.meta.items() if k != ONLINE_HADAMARD}
        node.replace_all_uses_with(new)
        erase_dead(graph, [node], erasable=lambda n: n is not x)  # the views and GEMMs, down to x
        rewritten += 1
    if rewritten:
        graph.lint()
        gm.recompile()
    return PassResult(gm, modified=rewritten > 0, counts={"online_hadamard": rewritten})
