"""The IR contract shared by passes and lowering: pass results, the ``node.meta`` records, the weight types.

``passes/`` and ``lowering/`` never import each other; both import ``qcompiler.core`` (this module,
``qcompiler.core.primitives``) and ``qcompiler.config``. ``passes/README.md`` lists which pass reads
and writes each key; ``lowering/README.md`` what the lowering reads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

import torch
import torch.fx as fx

from qcompiler.core import primitives, storage

# node.meta keys
PARAM_META = "qcompiler.param"  # ParamInfo, on placeholders of parameters/buffers (capture.bind_parameters)
LINEAR = "qcompiler.linear"  # LinearSite, on canonical linear nodes (canonicalize)
FLOAT_WEIGHT = "qcompiler.float_weight"  # fx.Node of the float weight a QDQ linear replaced (insert_qdq)
DECISION = "qcompiler.decision"  # LayerDecision, on canonical linear nodes (insert_qdq)
QLINEAR = "qcompiler.qlinear"  # QLinearSpec, on linear nodes whose inputs are QDQ (insert_qdq)
DERIVED = "qcompiler.derived"  # DerivedWeight, on get_attr nodes of transformed weights
CHANNELS = "qcompiler.channels"  # ChannelStats, on canonical linears: their input's per-channel range now
FLOAT_SIDE_BYTES = "qcompiler.float_side_bytes"  # int, on canonical linears with float outlier columns
TENSOR_INFO = "qcompiler.tensor_info"  # TensorInfo, on nodes a pass created (Dynamo's example_value is absent)
PLAN = "qcompiler.plan"  # LayerPlan, on canonical linears (the plan step); gm.meta[PLAN]: the graph's Plan
LOWERED_FROM = "qcompiler.lowered_from"  # QLinearSpec, on the kernel call that replaced a QDQ linear (lowering)
REPLACES = "qcompiler.replaces"  # str, on get_attr nodes of a transformed parameter: the parameter's name (export)
VALUE_FOLD = "qcompiler.value_fold"  # ValueFold, on the get_attr of a 1/s that multiplies an attention's output
QEMBEDDING = "qcompiler.qembedding"  # QEmbeddingSpec, on embedding lookups of a dequantized table (quantize_embeddings)
# (A buffer name or None, B buffer name), on the last node of an online Hadamard transform x @ kron(A, B) (rotate)
ONLINE_HADAMARD = "qcompiler.online_hadamard"


@dataclass(frozen=True)
class ValueFold:
    """Where a ``1/s`` multiplying an attention's per-head output (SmoothQuant's o_proj group) could live in
    the model's own weights: the rows of the value projection ``module`` (``None`` when the graph does not
    show it), with query head ``h`` reading key/value head ``h // repeats`` and ``head_dim`` channels per
    head; ``s`` is equal across the ``repeats`` heads that share a value head."""

    module: str | None
    repeats: int
    head_dim: int


@dataclass(frozen=True, eq=False)
class ParamInfo:
    """A parameter or buffer that Dynamo lifted into a placeholder."""

    name: str  # fully qualified, e.g. "model.layers.0.self_attn.q_proj.weight"
    tensor: torch.Tensor
    is_parameter: bool


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
    # an embedding table that reads the quantized weight of the LM head tied to it: that module's name (its
    # bytes count there, once; ``weight_bytes`` is what the table would take alone)
    shared_with: str = ""
    # the bytes the kernel holds in memory after lowering (its own layout: ATen's CPU int4 tiles with bf16 scale and
    # offset, float32 GEMV scales); 0 before lowering or unlowered, where it is ``weight_bytes``
    kernel_bytes: int = 0
    table: bool = False  # an embedding table's decision (quantize_embeddings), not a linear layer's

    @property
    def memory_bytes(self) -> int:
        """Bytes this layer's weight takes in memory as the compiled model runs it."""
        return self.kernel_bytes or self.weight_bytes


@dataclass(frozen=True)
class QLinearSpec:
    """Describes a quantized linear in QDQ form, for the lowering to match.

    Weight buffers are attributes of the GraphModule named ``w_q``, ``w_scale``, ``w_zero_point``
    (the last None for symmetric weights); a static activation range is in ``x_scale`` and
    ``x_zero_point`` (None when symmetric). ``weight_granularity`` is ``"per_channel"``,
    ``"per_group"`` (``group_size`` input channels per scale) or ``"per_tensor"``.
    """

    module: str
    weight_bits: int
    weight_symmetric: bool
    weight_granularity: str
    group_size: int | None
    activation: str | None  # "dynamic_per_token", "dynamic_per_tensor", "static_per_tensor", None (weight-only)
    activation_bits: int | None
    activation_symmetric: bool | None
    w_q: str
    w_scale: str
    w_zero_point: str | None
    has_bias: bool
    x_scale: str | None = None  # buffers of a static activation range
    x_zero_point: str | None = None


@dataclass(frozen=True)
class QEmbeddingSpec:
    """A quantized embedding table in QDQ form: ``embedding(ids, dequantize(w_q, w_scale, w_zero_point))``
    with ``w_q [rows, dim]`` and one scale (and float zero point, asymmetric) per row or per ``group_size``
    columns of a row; the scales and offsets are exactly representable in fp16 (what the lowering stores)."""

    module: str
    param: str
    weight_bits: int
    weight_symmetric: bool
    group_size: int  # columns per scale: the row width for per-row scales
    w_q: str
    w_scale: str
    w_zero_point: str | None


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


def fresh_name(gm: fx.GraphModule, stem: str, suffix: str = "") -> str:
    """``qc_<stem>`` made an identifier, numbered until neither it nor ``<it><suffix>`` is taken on ``gm``."""
    base = stem if stem.startswith("qc_") else "qc_" + re.sub(r"\W", "_", stem)
    name, i = base, 1
    while hasattr(gm, name) or hasattr(gm, name + suffix):
        name, i = f"{base}_{i}", i + 1
    return name


# --- the plan --------------------------------------------------------------------------------------

FLOAT_KERNEL = "float (Inductor)"  # LayerPlan.kernel of a layer that stays float


@dataclass(frozen=True)
class LayerPlan:
    """What the plan decided for one linear layer (``qcompiler/plan.py``), read by every later step.

    ``scheme`` is the recipe's :class:`~qcompiler.config.LayerScheme` for the layer, fitted to its
    width, or None when the layer stays float (``reason`` says why; otherwise ``reason`` holds notes
    such as a fitted group). ``kernel`` names what the layer will run on and ``kernel_reason`` why it
    is not the device's fast kernel (empty when it is).
    """

    module: str
    weight_param: str
    in_features: int
    out_features: int
    scheme: object | None  # config.LayerScheme
    reason: str = ""
    kernel: str = ""
    kernel_reason: str = ""

    @property
    def quantized(self) -> bool:
        return self.scheme is not None

    def with_width(self, in_features: int) -> LayerPlan:
        """The plan after a transform (outlier splitting, LLM.int8() columns) made the layer ``in_features``
        wide: the same scheme, or float and why when its group no longer divides the new width."""
        plan = replace(self, in_features=in_features)
        weight = None if self.scheme is None else self.scheme.weight
        if weight is not None and weight.granularity == "per_group" and in_features % weight.group_size:
            return replace(plan, scheme=None, kernel=FLOAT_KERNEL, kernel_reason="",
                           reason=f"in_features {in_features} is not a multiple of group_size {weight.group_size}")
        return plan


@dataclass(frozen=True)
class Plan:
    """The plan of one graph (``gm.meta[PLAN]``): a :class:`LayerPlan` per canonical linear, in graph order."""

    recipe: str
    device: str  # the device whose kernels were chosen; "" when none was (calibration)
    layers: tuple[LayerPlan, ...]

    @property
    def quantized(self) -> list[LayerPlan]:
        return [layer for layer in self.layers if layer.quantized]

    @property
    def kernels(self) -> dict[str, int]:
        """How many quantized layers run on each kernel."""
        out: dict[str, int] = {}
        for layer in self.quantized:
            out[layer.kernel] = out.get(layer.kernel, 0) + 1
        return out


def plan_of(node: fx.Node) -> LayerPlan | None:
    """The plan entry of a canonical linear node (None before the plan step ran)."""
    return node.meta.get(PLAN)


def set_plan(gm: fx.GraphModule, node: fx.Node, entry: LayerPlan) -> None:
    """Replace ``node``'s plan entry with ``entry``, on the node and in the graph's :class:`Plan`."""
    old = node.meta.get(PLAN)
    node.meta[PLAN] = entry
    plan = gm.meta.get(PLAN)
    if plan is None or old is None:
        return
    layers = list(plan.layers)
    i = next((i for i, layer in enumerate(layers) if layer is old), None)
    if i is None:  # a copied graph: its entries are equal, not the same objects
        i = next((i for i, layer in enumerate(layers) if layer == old), None)
    if i is not None:
        layers[i] = entry
        gm.meta[PLAN] = replace(plan, layers=tuple(layers))


# --- weights ---------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """Integer weight ``[out, in]`` with one scale (and zero point) per block."""

    q: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    block_size: tuple[int, ...]
    bits: int
    symmetric: bool

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return primitives.dequantize_math(self.q, self.scale, self.zero_point, self.block_size, dtype)

    @property
    def nbytes(self) -> int:
        """Bytes in the stored form (``qcompiler.core.storage``): integers packed at ``bits`` bits, scales and
        zero points as that module stores them. What an artifact holds for this weight."""
        return storage.weight_bytes(self.q, self.scale, self.zero_point, self.bits)

    @property
    def bits_per_weight(self) -> float:
        """Bits per weight of the stored form (:attr:`nbytes`)."""
        return 8.0 * self.nbytes / self.q.numel()


def weight_checksum(weight: torch.Tensor) -> float:
    """``sum |W|``: what a rounded layer remembers of the float weight it came from."""
    return float(weight.detach().double().abs().sum())


@dataclass(frozen=True, eq=False)
class RoundedLayer:
    """A layer's weight as GPTQ/AWQ rounded it. ``input_scale`` (AWQ): the layer's input is divided
    by it. ``checksum``: :func:`weight_checksum` of the float weight it came from, to catch stale results."""

    weight: QuantizedWeight
    method: str
    checksum: float
    input_scale: torch.Tensor | None = None
    note: str = ""

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight the layer computes with, as seen by its original (unscaled) input."""
        w = self.weight.dequantize(torch.float32)
        if self.input_scale is not None:
            w = w / self.input_scale
        return w.to(dtype)
