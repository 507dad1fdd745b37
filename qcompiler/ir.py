"""The IR contract shared by passes and lowering: pass results and the ``node.meta`` records.

``passes/`` and ``lowering/`` never import each other; both import this module and
``qcompiler.primitives``. ``passes/README.md`` lists which pass reads and writes each key.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

# node.meta keys
LINEAR = "qcompiler.linear"  # LinearSite, on canonical linear nodes (canonicalize)
DECISION = "qcompiler.decision"  # LayerDecision, on canonical linear nodes (insert_qdq)
QLINEAR = "qcompiler.qlinear"  # QLinearSpec, on linear nodes whose inputs are QDQ (insert_qdq)


@dataclass(frozen=True)
class PassResult:
    """What a pass returns. ``modified`` is true only when the graph changed.

    ``counts`` holds the pass's match counts; ``details`` one record per decision it made (the
    backend's report is built from them).
    """

    graph_module: fx.GraphModule
    modified: bool
    counts: dict[str, int] = field(default_factory=dict)
    details: tuple = ()


@dataclass(frozen=True)
class LinearSite:
    """A linear-like op in canonical form ``linear(x, weight, bias)``.

    ``weight_param`` is the qualified name of the parameter the weight comes from; when
    ``transposed`` the parameter is stored ``[in, out]`` (HF Conv1D, ``x @ W``) and the canonical
    weight is its transpose.
    """

    module: str
    weight_param: str
    transposed: bool
    in_features: int
    out_features: int
    has_bias: bool
    source_op: str


@dataclass(frozen=True)
class LayerDecision:
    """Whether a linear layer was quantized, with which scheme, or why it stayed in float."""

    module: str
    quantized: bool
    param: str = ""  # qualified name of the weight parameter
    scheme: str = ""
    reason: str = ""
    bits_per_weight: float = 32.0
    weight_bytes: int = 0
    float_weight_bytes: int = 0


@dataclass(frozen=True)
class QLinearSpec:
    """Describes a quantized linear in QDQ form, for the lowering to match.

    Weight buffers are attributes of the GraphModule named ``w_q``, ``w_scale``, ``w_zero_point``
    (the last None for symmetric weights); a static activation range is in ``x_scale`` and
    ``x_zero_point`` (None when symmetric).
    """

    module: str
    weight_bits: int
    weight_symmetric: bool
    weight_block_size: tuple[int, ...]
    activation: str | None  # "dynamic_per_token", "dynamic_per_tensor", "static_per_tensor", None (weight-only)
    activation_bits: int | None
    activation_symmetric: bool | None
    w_q: str
    w_scale: str
    w_zero_point: str | None
    has_bias: bool
    x_scale: str | None = None  # buffers of a static activation range
    x_zero_point: str | None = None


def nodes_with(gm: fx.GraphModule, key: str) -> list[fx.Node]:
    """Nodes of ``gm`` that carry meta ``key``, in graph order."""
    return [n for n in gm.graph.nodes if key in n.meta]
