"""The types the lowering table is made of: the key a quantized linear reduces to, what ``prepare``
hands to ``replace``, and a lowering (prepare, replace, choose, an optional CUDA variant)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from qcompiler.config import LayerScheme
from qcompiler.core.ir import QLinearSpec, fresh_name

REFERENCE_OPS = "reference quantize/dequantize ops"
# Rows (tokens x batch) at or below which a graph whose row count is fixed takes the C++ GEMV kernels
# (lowering/kernels/cpu_gemv.cpp): the decode step. Above, and for graphs with a symbolic row count
# (prefill), the library GEMMs.
GEMV_MAX_ROWS = 8


@dataclass(frozen=True)
class QLinearKey:
    weight_bits: int
    weight_symmetric: bool
    weight_granularity: str  # "per_channel", "per_group", "per_tensor"
    activation: str | None  # "dynamic_per_token", "dynamic_per_tensor", "static_per_tensor", None (weight-only)
    activation_bits: int | None
    activation_symmetric: bool | None

    def describe(self) -> str:
        act = f"A{self.activation_bits} {self.activation}" if self.activation else "A16/32"
        sym = "sym" if self.weight_symmetric else "asym"
        return f"W{self.weight_bits} {self.weight_granularity} {sym}, {act}"


def key_of(spec: QLinearSpec) -> QLinearKey:
    return QLinearKey(spec.weight_bits, spec.weight_symmetric, spec.weight_granularity, spec.activation,
                      spec.activation_bits, spec.activation_symmetric)


def key_of_scheme(scheme: LayerScheme) -> QLinearKey:
    """The key a layer quantized with ``scheme`` will have (what the plan looks its kernel up by)."""
    w, a = scheme.weight, scheme.activation
    return QLinearKey(w.bits, w.symmetric, w.granularity, a.kind if a is not None else None,
                      a.bits if a is not None else None, a.symmetric if a is not None else None)


@dataclass
class Prepared:
    """What ``replace`` is called with for one layer: ``buffers`` (keyword -> buffer name on the
    GraphModule, passed as ``get_attr`` nodes), ``constants`` (keyword -> Python value baked into the
    graph), the kernel's name, and the bytes the kernel's weight format holds (None: as quantized)."""

    buffers: dict[str, str] = field(default_factory=dict)
    constants: dict = field(default_factory=dict)
    kernel: str = ""
    stored_bytes: int | None = None


@dataclass(frozen=True)
class Layer:
    """The facts a lowering chooses by: the weight's shape and group, the graph's row count for this
    layer (None when symbolic), and the device whose kernels run it."""

    n: int
    k: int
    group: int
    rows: int | None
    device: torch.device

    @property
    def gemv(self) -> bool:
        """A fixed, small row count on a CPU: the decode step's shape."""
        return self.device.type == "cpu" and self.rows is not None and self.rows <= GEMV_MAX_ROWS


@dataclass(frozen=True)
class Lowering:
    # (gm, spec, layer) -> Prepared, or a string saying why the layer keeps its QDQ form
    prepare: Callable[[fx.GraphModule, QLinearSpec, Layer], "Prepared | str"]
    replace: Callable
    # layer -> (kernel, why not the fast one or ""): what prepare will choose, for the plan
    choose: Callable[[Layer], tuple[str, str]]
    cuda: "Lowering | None" = None  # the variant for CUDA devices, where it differs

    def for_device(self, device: torch.device) -> "Lowering":
        return self.cuda if device.type == "cuda" and self.cuda is not None else self


def register(gm: fx.GraphModule, base: str, tensor: torch.Tensor) -> str:
    """Register ``tensor`` as a buffer under a fresh name built from ``base``; returns the name."""
    name = fresh_name(gm, base)
    gm.register_buffer(name, tensor)
    return name
