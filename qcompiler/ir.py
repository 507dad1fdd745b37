"""The IR contract shared by passes and lowering: pass results and the ``node.meta`` records.

``passes/`` and ``lowering/`` never import each other; both import this module and
``qcompiler.primitives``. ``passes/README.md`` lists which pass reads and writes each key.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

# node.meta keys
LINEAR = "qcompiler.linear"  # LinearSite, on canonical linear nodes (canonicalize)
FLOAT_WEIGHT = "qcompiler.float_weight"  # fx.Node of the float weight a QDQ linear replaced (insert_qdq)
DECISION = "qcompiler.decision"  # LayerDecision, on canonical linear nodes (insert_qdq)
QLINEAR = "qcompiler.qlinear"  # QLinearSpec, on linear nodes whose inputs are QDQ (insert_qdq)
DERIVED = "qcompiler.derived"  # DerivedWeight, on get_attr nodes of transformed weights
CHANNELS = "qcompiler.channels"  # ChannelStats, on canonical linears: their input's per-channel range now
FLOAT_SIDE_BYTES = "qcompiler.float_side_bytes"  # int, on canonical linears with float outlier columns
TENSOR_INFO = "qcompiler.tensor_info"  # TensorInfo, on nodes a pass created (Dynamo's example_value is absent)


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


@dataclass(frozen=True, eq=False)
class DerivedWeight:
    """A weight a transform pass computed from a parameter (SmoothQuant scaling, split columns, ...).

    ``key`` names the transform chain; with ``origin`` it keys the quantized-weight cache, so an
    unchanged transform of an unchanged parameter is not quantized again on recompiles.
    """

    origin: object  # the torch.nn.Parameter the weight was computed from
    key: tuple
    param_name: str


@dataclass(frozen=True, eq=False)
class ChannelStats:
    """Per-input-channel min/max of a linear's input as the graph computes it now (after transforms),
    and a few sample rows (for searches such as SmoothQuant's alpha); from raw calibration stats."""

    channel_min: object  # torch.Tensor [K]
    channel_max: object  # torch.Tensor [K]
    samples: object = None  # torch.Tensor [n, K] or None

    @property
    def absmax(self):
        return self.channel_min.abs().maximum(self.channel_max.abs())


def linear_weight(gm: fx.GraphModule, w_node: fx.Node):
    """``(weight [out, in], cache_owner, cache_key)`` of a canonical linear's weight argument."""
    from qcompiler.capture import PARAM_META

    if w_node.op == "placeholder":
        param = w_node.meta[PARAM_META].tensor
        return param, param, ("param",)
    if w_node.op == "call_function" and w_node.args and getattr(w_node.args[0], "op", None) == "placeholder":
        param = w_node.args[0].meta[PARAM_META].tensor
        return param.t(), param, ("param", "t")
    if w_node.op == "get_attr" and DERIVED in w_node.meta:
        derived = w_node.meta[DERIVED]
        return getattr(gm, w_node.target), derived.origin, derived.key
    raise ValueError(f"unexpected weight node {w_node.format_node()} for a canonical linear")


@dataclass(frozen=True)
class TensorInfo:
    """Rank and dtype of a node's value: what the passes need to know about an activation."""

    ndim: int
    dtype: object  # torch.dtype


def tensor_info(node) -> TensorInfo | None:
    """From Dynamo's ``example_value``, or from the ``TensorInfo`` a pass recorded on a node it made."""
    if not isinstance(node, fx.Node):
        return None
    value = node.meta.get("example_value")
    if value is not None and hasattr(value, "dim") and hasattr(value, "dtype"):
        return TensorInfo(value.dim(), value.dtype)
    return node.meta.get(TENSOR_INFO)
