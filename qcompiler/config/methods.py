"""The methods a recipe can ask for: transforms (SmoothQuant, outlier splitting, LLM.int8()) and weight
rounding (GPTQ, AWQ, HQQ). Plain data; the algorithms live in ``passes/``."""

from __future__ import annotations

from dataclasses import dataclass

from qcompiler.config.schemes import _check_choice
from qcompiler.core.errors import ConfigError


@dataclass(frozen=True)
class SmoothQuant:
    """SmoothQuant migration: ``s = max|X|^alpha / max|W|^(1-alpha)`` per input channel of each group.

    ``alpha`` is a number in [0, 1] or ``"auto"``: searched per group over ``alpha_grid`` to minimize
    the group's output error after quantization, on sample rows kept during calibration.
    ``groups`` says which producer -> consumer groups to smooth: ``"norm"`` (a norm's weight into
    the linears it feeds: q/k/v, gate/up), ``"linear"`` (a linear into another through an
    elementwise product, as up -> down through ``act(gate) * up``) and ``"attention"`` (a linear
    reading an attention's output, as o_proj: its input is multiplied by ``1 / s``).
    """

    alpha: float | str = 0.5
    alpha_grid: tuple[float, ...] = tuple(i / 20 for i in range(21))
    groups: tuple[str, ...] = ("norm", "linear", "attention")

    def __post_init__(self) -> None:
        if self.alpha != "auto" and not (isinstance(self.alpha, (int, float)) and 0.0 <= self.alpha <= 1.0):
            raise ConfigError(f"SmoothQuant.alpha must be in [0, 1] or 'auto', got {self.alpha!r}")
        if not self.alpha_grid or not all(0.0 <= a <= 1.0 for a in self.alpha_grid):
            raise ConfigError("SmoothQuant.alpha_grid must be a non-empty tuple of values in [0, 1]")
        object.__setattr__(self, "alpha_grid", tuple(float(a) for a in self.alpha_grid))
        unknown = set(self.groups) - {"norm", "linear", "attention"}
        if unknown or not self.groups:
            raise ConfigError("SmoothQuant.groups must be a non-empty subset of ('norm', 'linear', 'attention'), "
                             f"got {self.groups!r}")
        object.__setattr__(self, "groups", tuple(self.groups))


@dataclass(frozen=True)
class OutlierSplit:
    """Outlier channel splitting (Zhao et al. 2019): duplicate input channels and halve them.

    ``mode="activation"`` splits the channels with the largest calibrated ``max|X|``;
    ``mode="weight"`` (data-free) those with the largest ``max|W|`` column, with quantization-aware
    halves when ``quant_aware``. ``expand_ratio`` is the budget of extra channels per layer.
    """

    mode: str = "activation"
    expand_ratio: float = 0.02
    quant_aware: bool = True

    def __post_init__(self) -> None:
        _check_choice(self.mode, ("activation", "weight"), "OutlierSplit.mode")
        if not isinstance(self.expand_ratio, (int, float)) or not 0.0 < self.expand_ratio <= 1.0:
            raise ConfigError(f"OutlierSplit.expand_ratio must be in (0, 1], e.g. 0.02; got {self.expand_ratio!r}")


@dataclass(frozen=True)
class MixedInt8:
    """LLM.int8()-style decomposition: input columns whose calibrated ``max|X|`` exceeds
    ``threshold`` are multiplied in float; the rest go through the int8 GEMM."""

    threshold: float = 6.0

    def __post_init__(self) -> None:
        if not isinstance(self.threshold, (int, float)) or self.threshold <= 0:
            raise ConfigError(f"MixedInt8.threshold must be positive, got {self.threshold!r}")


@dataclass(frozen=True)
class GPTQ:
    """GPTQ weight rounding (Frantar et al. 2022) from the Hessian ``X^T X`` of each layer's inputs.

    ``damp``: fraction of the mean Hessian diagonal added to it; ``block_size``: columns per lazy
    update; ``act_order``: round columns by decreasing Hessian diagonal; ``static_groups``: group
    scales from the original weight up front (always so with ``act_order``); ``clip_grid``: when above 0,
    each group's range is the min-max range shrunk by the ratio among ``clip_grid + 1`` steps from 1.0
    down to ``min_clip`` whose rounding error, weighted per input channel by the Hessian's diagonal (the
    channel's mean squared input), is smallest (0: min-max ranges, the paper's).
    """

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    static_groups: bool = False
    clip_grid: int = 0
    min_clip: float = 0.7

    def __post_init__(self) -> None:
        if not (isinstance(self.damp, (int, float)) and 0 < self.damp < 1):
            raise ConfigError(f"GPTQ.damp must be in (0, 1), got {self.damp!r}")
        if not (isinstance(self.block_size, int) and self.block_size >= 1):
            raise ConfigError(f"GPTQ.block_size must be a positive int, got {self.block_size!r}")
        if not (isinstance(self.clip_grid, int) and not isinstance(self.clip_grid, bool) and self.clip_grid >= 0):
            raise ConfigError(f"GPTQ.clip_grid must be an int of at least 0 (0: no clipping search), "
                              f"got {self.clip_grid!r}")
        if not (isinstance(self.min_clip, (int, float)) and 0 < self.min_clip <= 1):
            raise ConfigError(f"GPTQ.min_clip must be in (0, 1], got {self.min_clip!r}")


@dataclass(frozen=True)
class AWQ:
    """Activation-aware weight quantization (Lin et al. 2023): per input channel scales
    ``s = mean|X|^alpha`` (``alpha`` searched on ``grid`` points in [0, 1]) applied to the weight
    columns (and ``1/s`` to the layer's input), then a per-group clipping search over ``clip_grid``
    ratios down to ``min_clip``; both minimize the layer's output error on the calibration inputs.

    ``foldable`` (default): the scales are found so that ``1/s`` can live in the model's own weights, as the
    AWQ paper applies them: the layers that read one input (q/k/v after a norm, gate/up) share one ``s``
    (``alpha`` minimizes their summed error) and ``1/s`` is folded into the norm's weight; a layer whose
    input is made by a linear (down_proj from ``act(gate) * up``, o_proj from the value projection) gets
    powers of two (tied across the query heads that share a value head), folded into that producer's row
    scales exactly. Layers with no such producer keep ``s = 1`` (clipping only). The model keeps its
    architecture, so the result exports (compressed-tensors, GGUF). ``foldable=False``: every layer its own
    ``s``, its input divided at run time (not exportable)."""

    grid: int = 20
    clip: bool = True
    clip_grid: int = 20
    min_clip: float = 0.5
    foldable: bool = True

    def __post_init__(self) -> None:
        if not (isinstance(self.grid, int) and self.grid >= 1):
            raise ConfigError(f"AWQ.grid must be a positive int, got {self.grid!r}")
        if not (isinstance(self.clip_grid, int) and self.clip_grid >= 1):
            raise ConfigError(f"AWQ.clip_grid must be a positive int, got {self.clip_grid!r}")
        if not 0 < self.min_clip <= 1:
            raise ConfigError(f"AWQ.min_clip must be in (0, 1], got {self.min_clip!r}")
        if not isinstance(self.foldable, bool):
            raise ConfigError(f"AWQ.foldable must be True or False, got {self.foldable!r}")


@dataclass(frozen=True)
class HQQ:
    """Half-quadratic quantization (Badri & Shaji 2023), data-free: the zero point of each group is
    optimized for a sparsity-promoting ``lp_norm`` (< 1) of the weight error by alternating a
    generalized soft-threshold with a closed-form zero update, ``iters`` times, ``beta`` growing by
    ``kappa`` each step. Needs asymmetric weights (it moves the zero point)."""

    iters: int = 20
    lp_norm: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01

    def __post_init__(self) -> None:
        if not (isinstance(self.iters, int) and self.iters >= 1):
            raise ConfigError(f"HQQ.iters must be a positive int, got {self.iters!r}")
        if not 0 < self.lp_norm <= 1:
            raise ConfigError(f"HQQ.lp_norm must be in (0, 1], got {self.lp_norm!r}")


ROUNDINGS = (GPTQ, AWQ, HQQ)


@dataclass(frozen=True)
class Rotation:
    """Rotate the residual stream by an orthogonal matrix (QuaRot's change of basis, data-free): the norms'
    weights folded into the linears they feed, the embedding's rows and every residual reader's input
    columns multiplied by ``Q``, every residual writer's output rows by ``Q^T``, so the float model computes
    the same function while outlier channels are spread over all channels. ``Q`` is a Hadamard matrix with
    random signs (``seed``) where one of the stream's width is built (``qcompiler.core.hadamard``), else a
    random orthogonal matrix. ``online``: the down projections' inputs also go through a Hadamard transform
    at run time (its Kronecker form, a few small matmuls), the inverse folded into their weights' columns.
    The stream is rotated in pre-norm models (RMS norms, or GPT-2's LayerNorms, before the residual readers).
    ``fallback``: where the graph has no stream this can rotate (a post-norm encoder: BERT, MiniLM), every
    quantized linear's input goes through an online Hadamard transform instead, ``H`` folded into its weight
    (the report says why the stream was not rotated); False raises the reason as an error instead."""

    seed: int = 0
    online: bool = True
    fallback: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"Rotation.seed must be a non-negative int, got {self.seed!r}")
        for name in ("online", "fallback"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"Rotation.{name} must be True or False, got {getattr(self, name)!r}")
