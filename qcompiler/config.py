"""Recipes and backend options: frozen dataclasses, validated when they are built.

A :class:`Recipe` says, per linear layer (found by module name), how its weight and its input activation
are quantized. Presets are named recipes; ``torch.compile(..., options={"recipe": name_or_recipe})``
takes either.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace

from qcompiler import primitives
from qcompiler.observers import OBSERVERS, WEIGHT_OBSERVERS

WEIGHT_GRANULARITIES = ("per_channel", "per_group", "per_tensor")
ACTIVATION_GRANULARITIES = ("per_token", "per_tensor")


def _check_bits(bits: int, what: str) -> None:
    if not isinstance(bits, int) or bits not in primitives.SUPPORTED_BITS:
        raise ValueError(f"{what}.bits must be an integer from 2 to 8, got {bits!r}")


def _check_percentile(value: float, what: str) -> None:
    if not isinstance(value, (int, float)) or not 50.0 < value <= 100.0:
        raise ValueError(f"{what}.percentile must be in (50, 100], e.g. 99.99; got {value!r}")


def _check_choice(value: str, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise ValueError(f"{what} must be one of {', '.join(choices)}; got {value!r}")


@dataclass(frozen=True)
class WeightScheme:
    """How a linear layer's weight ``[out_features, in_features]`` is quantized."""

    bits: int = 8
    granularity: str = "per_channel"
    group_size: int | None = None
    symmetric: bool = True
    observer: str = "minmax"  # range per block: minmax, percentile, mse or kl (computed on the weight itself)
    percentile: float = 99.99
    # per_group: a layer whose in_features is not a multiple of group_size takes the largest power-of-two
    # group (>= 32) that divides it, instead of staying in float (see fitted)
    fit_group: bool = False

    def __post_init__(self) -> None:
        _check_bits(self.bits, "WeightScheme")
        _check_choice(self.granularity, WEIGHT_GRANULARITIES, "WeightScheme.granularity")
        _check_choice(self.observer, WEIGHT_OBSERVERS, "WeightScheme.observer")
        if self.observer == "kl" and self.granularity == "per_group":
            raise ValueError("WeightScheme.observer='kl' searches a histogram per block in Python and is offered per "
                             "channel or per tensor only; for per-group weights use 'mse' (or HQQ/GPTQ/AWQ rounding)")
        _check_percentile(self.percentile, "WeightScheme")
        if self.granularity == "per_group":
            if not isinstance(self.group_size, int) or self.group_size < 1:
                raise ValueError(
                    f"WeightScheme with granularity 'per_group' needs a positive group_size, got "
                    f"{self.group_size!r}"
                )
        elif self.group_size is not None:
            raise ValueError(
                f"group_size={self.group_size} only applies to granularity 'per_group', not "
                f"{self.granularity!r}"
            )
        if self.fit_group and self.granularity != "per_group":
            raise ValueError(f"fit_group=True only applies to granularity 'per_group', not {self.granularity!r}")

    def fitted(self, in_features: int) -> WeightScheme:
        """The scheme for a layer with ``in_features`` inputs: with ``fit_group``, a group size that does
        not divide ``in_features`` becomes the largest power of two of at least 32 that does (64 for
        SmolLM2's 576-wide layers at group 128); unchanged when none does."""
        if not self.fit_group or in_features % self.group_size == 0:
            return self
        fits = [2**p for p in range(5, 16) if 2**p < self.group_size and in_features % 2**p == 0]
        return replace(self, group_size=max(fits)) if fits else self

    @property
    def qrange(self) -> tuple[int, int]:
        return primitives.quant_range(self.bits, self.symmetric)

    def block_size(self) -> tuple[int, ...]:
        if self.granularity == "per_channel":
            return primitives.per_channel(2, axis=0)
        if self.granularity == "per_group":
            return primitives.per_group(2, self.group_size)
        return primitives.per_tensor(2)

    def describe(self) -> str:
        gran = f"g{self.group_size}" if self.granularity == "per_group" else self.granularity
        obs = "" if self.observer == "minmax" else f" {self.observer}"
        return f"int{self.bits} {gran} {'sym' if self.symmetric else 'asym'}{obs}"


@dataclass(frozen=True)
class ActivationScheme:
    """How a linear layer's input activation is quantized.

    Dynamic: the range is taken from each input at run time (per token or per tensor).
    Static: one per-tensor range fixed from calibration statistics by ``observer`` (minmax, ema,
    percentile, mse, kl); it needs ``stats`` from :func:`qcompiler.calibrate`.
    ``symmetric`` defaults to True for dynamic and False (asymmetric, uint8) for static.
    """

    bits: int = 8
    granularity: str = "per_token"
    symmetric: bool | None = None
    dynamic: bool = True
    observer: str = "minmax"
    percentile: float = 99.99

    def __post_init__(self) -> None:
        _check_bits(self.bits, "ActivationScheme")
        _check_choice(self.granularity, ACTIVATION_GRANULARITIES, "ActivationScheme.granularity")
        _check_choice(self.observer, OBSERVERS, "ActivationScheme.observer")
        _check_percentile(self.percentile, "ActivationScheme")
        if self.symmetric is None:
            object.__setattr__(self, "symmetric", self.dynamic)
        if self.dynamic and self.observer != "minmax":
            raise ValueError(
                f"observer {self.observer!r} selects a static range; dynamic activations take each input's "
                "min/max at run time. Use dynamic=False for a calibrated range."
            )
        if not self.dynamic and self.granularity != "per_tensor":
            raise ValueError(
                f"static activations are quantized per tensor (a {self.granularity} range exists only at run "
                "time); use granularity='per_tensor' or dynamic=True"
            )

    @property
    def qrange(self) -> tuple[int, int]:
        return primitives.quant_range(self.bits, self.symmetric)

    def block_size(self, ndim: int) -> tuple[int, ...]:
        if self.granularity == "per_token":
            return primitives.per_token(ndim)
        return primitives.per_tensor(ndim)

    @property
    def kind(self) -> str:
        return f"{'dynamic' if self.dynamic else 'static'}_{self.granularity}"

    def describe(self) -> str:
        how = "dynamic" if self.dynamic else f"static {self.observer}"
        if not self.dynamic and self.observer == "percentile":
            how += f" {self.percentile}"
        return f"int{self.bits} {how} {self.granularity} {'sym' if self.symmetric else 'asym'}"


@dataclass(frozen=True)
class LayerScheme:
    """The resolved scheme of one layer. ``activation is None`` means weight-only quantization."""

    weight: WeightScheme
    activation: ActivationScheme | None

    def describe(self) -> str:
        act = self.activation.describe() if self.activation else "float activations"
        return f"W: {self.weight.describe()}; A: {act}"

    def fitted(self, in_features: int) -> LayerScheme:
        """This scheme for a layer of ``in_features`` inputs (:meth:`WeightScheme.fitted`)."""
        weight = self.weight.fitted(in_features)
        return self if weight is self.weight else LayerScheme(weight, self.activation)


@dataclass(frozen=True)
class LayerOverride:
    """Per-layer change to a recipe, for modules whose name matches ``pattern`` (fnmatch syntax).

    ``weight``/``activation`` left as ``None`` inherit the recipe's; ``weight_only=True`` keeps the
    matched layers' activations in float.
    """

    pattern: str
    weight: WeightScheme | None = None
    activation: ActivationScheme | None = None
    weight_only: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str) or not self.pattern:
            raise ValueError("LayerOverride.pattern must be a non-empty module-name pattern")
        if self.weight is not None and not isinstance(self.weight, WeightScheme):
            raise TypeError(f"LayerOverride.weight must be a WeightScheme or None, got {type(self.weight).__name__}")
        if self.activation is not None and not isinstance(self.activation, ActivationScheme):
            raise TypeError(
                f"LayerOverride.activation must be an ActivationScheme or None, got {type(self.activation).__name__}"
            )
        if self.weight_only and self.activation is not None:
            raise ValueError("LayerOverride: give either an activation scheme or weight_only=True, not both")


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
            raise ValueError(f"SmoothQuant.alpha must be in [0, 1] or 'auto', got {self.alpha!r}")
        if not self.alpha_grid or not all(0.0 <= a <= 1.0 for a in self.alpha_grid):
            raise ValueError("SmoothQuant.alpha_grid must be a non-empty tuple of values in [0, 1]")
        object.__setattr__(self, "alpha_grid", tuple(float(a) for a in self.alpha_grid))
        unknown = set(self.groups) - {"norm", "linear", "attention"}
        if unknown or not self.groups:
            raise ValueError("SmoothQuant.groups must be a non-empty subset of ('norm', 'linear', 'attention'), "
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
            raise ValueError(f"OutlierSplit.expand_ratio must be in (0, 1], e.g. 0.02; got {self.expand_ratio!r}")


@dataclass(frozen=True)
class MixedInt8:
    """LLM.int8()-style decomposition: input columns whose calibrated ``max|X|`` exceeds
    ``threshold`` are multiplied in float; the rest go through the int8 GEMM."""

    threshold: float = 6.0

    def __post_init__(self) -> None:
        if not isinstance(self.threshold, (int, float)) or self.threshold <= 0:
            raise ValueError(f"MixedInt8.threshold must be positive, got {self.threshold!r}")


@dataclass(frozen=True)
class GPTQ:
    """GPTQ weight rounding (Frantar et al. 2022) from the Hessian ``X^T X`` of each layer's inputs.

    ``damp``: fraction of the mean Hessian diagonal added to it; ``block_size``: columns per lazy
    update; ``act_order``: round columns by decreasing Hessian diagonal; ``static_groups``: group
    scales from the original weight up front (always so with ``act_order``).
    """

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    static_groups: bool = False

    def __post_init__(self) -> None:
        if not (isinstance(self.damp, (int, float)) and 0 < self.damp < 1):
            raise ValueError(f"GPTQ.damp must be in (0, 1), got {self.damp!r}")
        if not (isinstance(self.block_size, int) and self.block_size >= 1):
            raise ValueError(f"GPTQ.block_size must be a positive int, got {self.block_size!r}")


@dataclass(frozen=True)
class AWQ:
    """Activation-aware weight quantization (Lin et al. 2023): per input channel scales
    ``s = mean|X|^alpha`` (``alpha`` searched on ``grid`` points in [0, 1]) applied to the weight
    columns (and ``1/s`` to the layer's input), then a per-group clipping search over ``clip_grid``
    ratios down to ``min_clip``; both minimize the layer's output error on the calibration inputs."""

    grid: int = 20
    clip: bool = True
    clip_grid: int = 20
    min_clip: float = 0.5

    def __post_init__(self) -> None:
        if not (isinstance(self.grid, int) and self.grid >= 1):
            raise ValueError(f"AWQ.grid must be a positive int, got {self.grid!r}")
        if not (isinstance(self.clip_grid, int) and self.clip_grid >= 1):
            raise ValueError(f"AWQ.clip_grid must be a positive int, got {self.clip_grid!r}")
        if not 0 < self.min_clip <= 1:
            raise ValueError(f"AWQ.min_clip must be in (0, 1], got {self.min_clip!r}")


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
            raise ValueError(f"HQQ.iters must be a positive int, got {self.iters!r}")
        if not 0 < self.lp_norm <= 1:
            raise ValueError(f"HQQ.lp_norm must be in (0, 1], got {self.lp_norm!r}")


ROUNDINGS = (GPTQ, AWQ, HQQ)


@dataclass(frozen=True)
class Recipe:
    """What to quantize and how. Module-name patterns use fnmatch syntax (``*.mlp.*``, ``lm_head``)."""

    name: str = "custom"
    weight: WeightScheme = field(default_factory=WeightScheme)
    activation: ActivationScheme | None = field(default_factory=ActivationScheme)
    skip: tuple[str, ...] = ("lm_head", "*embed*")
    overrides: tuple[LayerOverride, ...] = ()
    smoothquant: SmoothQuant | None = None
    split_outliers: OutlierSplit | None = None
    mixed_int8: MixedInt8 | None = None
    rounding: GPTQ | AWQ | HQQ | None = None  # None: round to nearest

    def __post_init__(self) -> None:
        if not isinstance(self.weight, WeightScheme):
            raise TypeError(f"Recipe.weight must be a WeightScheme, got {type(self.weight).__name__}")
        if self.activation is not None and not isinstance(self.activation, ActivationScheme):
            raise TypeError(
                f"Recipe.activation must be an ActivationScheme or None, got {type(self.activation).__name__}"
            )
        if isinstance(self.skip, str) or not all(isinstance(p, str) for p in self.skip):
            raise TypeError("Recipe.skip must be a tuple of module-name patterns, e.g. ('lm_head',)")
        object.__setattr__(self, "skip", tuple(self.skip))
        if isinstance(self.overrides, LayerOverride) or not all(isinstance(o, LayerOverride) for o in self.overrides):
            raise TypeError("Recipe.overrides must be a tuple of LayerOverride")
        object.__setattr__(self, "overrides", tuple(self.overrides))
        for name, kind in (("smoothquant", SmoothQuant), ("split_outliers", OutlierSplit), ("mixed_int8", MixedInt8)):
            value = getattr(self, name)
            if value is not None and not isinstance(value, kind):
                raise TypeError(f"Recipe.{name} must be a {kind.__name__} or None, got {type(value).__name__}")
        if self.rounding is not None and not isinstance(self.rounding, ROUNDINGS):
            raise TypeError(f"Recipe.rounding must be GPTQ(), AWQ(), HQQ() or None (round to nearest), got "
                            f"{type(self.rounding).__name__}")
        if self.rounding is not None and self.transforms:
            raise ValueError("Recipe: GPTQ/AWQ/HQQ rounding cannot be combined with SmoothQuant, outlier splitting "
                             "or LLM.int8() in one recipe yet; use one or the other")
        weights = [self.weight] + [o.weight for o in self.overrides if o.weight is not None]
        if isinstance(self.rounding, HQQ) and any(w.symmetric for w in weights):
            raise ValueError("Recipe: HQQ optimizes the zero point, so it needs asymmetric weights "
                             "(WeightScheme(symmetric=False)), in the recipe and in every override")

    def scheme_for(self, module_name: str) -> LayerScheme | None:
        """The layer's scheme, or None when a skip pattern matches it."""
        if self.skip_pattern_for(module_name) is not None:
            return None
        weight, activation = self.weight, self.activation
        for override in self.overrides:
            if fnmatch.fnmatchcase(module_name, override.pattern):
                weight = override.weight or weight
                if override.weight_only:
                    activation = None
                elif override.activation is not None:
                    activation = override.activation
        return LayerScheme(weight, activation)

    def skip_pattern_for(self, module_name: str) -> str | None:
        return next((p for p in self.skip if fnmatch.fnmatchcase(module_name, p)), None)

    @property
    def has_static_activations(self) -> bool:
        acts = [self.activation] + [o.activation for o in self.overrides]
        return any(a is not None and not a.dynamic for a in acts)

    @property
    def transforms(self) -> tuple:
        """The function-changing-before-rounding passes the recipe asks for, in pipeline order."""
        return tuple(t for t in (self.smoothquant, self.split_outliers, self.mixed_int8) if t is not None)

    @property
    def data_driven_rounding(self) -> bool:
        """GPTQ and AWQ round weights from calibration inputs (HQQ and RTN need none)."""
        return isinstance(self.rounding, (GPTQ, AWQ))

    @property
    def needs_calibration(self) -> bool:
        """True when a static activation range, a data-driven transform or rounding needs statistics."""
        data_driven = [t for t in self.transforms if not (isinstance(t, OutlierSplit) and t.mode == "weight")]
        return self.has_static_activations or bool(data_driven) or self.data_driven_rounding

    def rounding_fingerprint(self) -> str:
        """Identifies what GPTQ/AWQ results depend on: the method, the weight schemes, the skip list."""
        return repr((self.rounding, self.weight, tuple((o.pattern, o.weight) for o in self.overrides), self.skip))

    def transform_fingerprint(self) -> str:
        """Identifies the transforms (and the skip list) that statistics after transforms depend on."""
        return repr((self.transforms, self.skip))


PRESETS: dict[str, Recipe] = {
    "w8a8-dynamic": Recipe(
        name="w8a8-dynamic",
        weight=WeightScheme(bits=8, granularity="per_channel", symmetric=True),
        activation=ActivationScheme(bits=8, granularity="per_token", symmetric=True),
    ),
}


def _static(name: str, observer: str, **kwargs) -> Recipe:
    return Recipe(
        name=name,
        weight=WeightScheme(bits=8, granularity="per_channel", symmetric=True),
        activation=ActivationScheme(bits=8, granularity="per_tensor", dynamic=False, observer=observer, **kwargs),
    )


PRESETS.update({
    "w8a8-static": _static("w8a8-static", "minmax"),
    "w8a8-smoothquant": replace(_static("w8a8-smoothquant", "minmax"), smoothquant=SmoothQuant(alpha=0.5)),
    "w8a8-smoothquant-auto": replace(_static("w8a8-smoothquant-auto", "minmax"), smoothquant=SmoothQuant(alpha="auto")),
    "w8a8-ocs": replace(_static("w8a8-ocs", "minmax"), split_outliers=OutlierSplit()),
    "llm-int8": replace(_static("llm-int8", "minmax"), mixed_int8=MixedInt8()),
    # the best combination measured on SmolLM2 (README): split the largest activation channels, then
    # keep the columns still above 4.0 in float
    "w8a8-ocs-llm-int8": replace(_static("w8a8-ocs-llm-int8", "minmax"), split_outliers=OutlierSplit(),
                                 mixed_int8=MixedInt8(threshold=4.0)),
    "w8a8-static-ema": _static("w8a8-static-ema", "ema"),
    "w8a8-static-percentile": _static("w8a8-static-percentile", "percentile", percentile=99.99),
    "w8a8-static-mse": _static("w8a8-static-mse", "mse"),
    "w8a8-static-kl": _static("w8a8-static-kl", "kl"),
})



def _weight_only(name: str, bits: int = 4, group_size: int = 128, **kwargs) -> Recipe:
    return Recipe(
        name=name,
        weight=WeightScheme(bits=bits, granularity="per_group", group_size=group_size, symmetric=False,
                            fit_group=True),
        activation=None,
        **kwargs,
    )


PRESETS.update({
    # 4-bit weights in groups of 128 along the input dimension (asymmetric), float activations
    "w4a16-rtn": _weight_only("w4a16-rtn"),
    "w4a16-gptq": _weight_only("w4a16-gptq", rounding=GPTQ()),
    "w4a16-awq": _weight_only("w4a16-awq", rounding=AWQ()),
    "w4a16-hqq": _weight_only("w4a16-hqq", rounding=HQQ()),
})

DEFAULT_RECIPE = "w8a8-dynamic"


def resolve_recipe(recipe: str | Recipe | None) -> Recipe:
    if recipe is None:
        return PRESETS[DEFAULT_RECIPE]
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, str):
        if recipe not in PRESETS:
            raise ValueError(f"unknown recipe {recipe!r}; the presets are: {', '.join(sorted(PRESETS))}")
        return PRESETS[recipe]
    raise TypeError(f"recipe must be a preset name or a qcompiler.Recipe, got {type(recipe).__name__}")


KERNEL_CHOICES = ("fast", "reference")


@dataclass(frozen=True)
class BackendOptions:
    """The ``options=`` of ``torch.compile(model, backend="qcompiler", options=...)``.

    recipe:  preset name or :class:`Recipe` (default ``w8a8-dynamic``).
    kernels: ``"fast"`` lowers quantized linears to integer kernels; ``"reference"`` leaves the
             quantize/dequantize graph as written (slow, for checking the kernels against).
    stats:   calibration statistics (or their folder) for recipes with static activation ranges
             or GPTQ/AWQ rounding.
    debug:   a folder to write pass-by-pass dumps to (``qcompiler/debug.py``); also ``QCOMPILER_DUMP``.
    artifact: a folder written by ``qcompiler quantize`` (``qcompiler/artifact.py``): its recipe,
             statistics and saved tensors are used, nothing is recalibrated.
    """

    recipe: Recipe = field(default_factory=lambda: PRESETS[DEFAULT_RECIPE])
    kernels: str = "fast"
    stats: object = None  # CalibrationStats or a folder written by CalibrationStats.save
    debug: object = None  # str or Path
    artifact: object = None  # a folder; an artifact.Artifact once resolved

    def __post_init__(self) -> None:
        from qcompiler import stats as stats_mod

        object.__setattr__(self, "recipe", resolve_recipe(self.recipe))
        _check_choice(self.kernels, KERNEL_CHOICES, "option 'kernels'")
        if self.debug is not None and not isinstance(self.debug, (str, os.PathLike)):
            raise TypeError(f"option 'debug' must be a folder path, got {type(self.debug).__name__}")
        object.__setattr__(self, "stats", stats_mod.resolve(self.stats))
        if self.artifact is not None:
            from qcompiler.artifact import Artifact

            if not isinstance(self.artifact, Artifact):
                if not isinstance(self.artifact, (str, os.PathLike)):
                    raise TypeError(f"option 'artifact' must be a folder path, got {type(self.artifact).__name__}")
                object.__setattr__(self, "artifact", Artifact(self.artifact))
            object.__setattr__(self, "recipe", self.artifact.recipe)
            object.__setattr__(self, "stats", self.artifact.stats)
        if self.recipe.needs_calibration and self.stats is None:
            why = ("rounds weights on calibration data (GPTQ/AWQ)" if self.recipe.data_driven_rounding
                   else "quantizes activations with static ranges")
            raise ValueError(
                f"recipe {self.recipe.name!r} {why} and needs calibration "
                "statistics: stats = qcompiler.calibrate(model, batches, recipe), then "
                "options={'recipe': ..., 'stats': stats} (or a folder saved with stats.save(path))"
            )

    @classmethod
    def from_user(cls, options: Mapping | None) -> BackendOptions:
        if options is None:
            return cls()
        if isinstance(options, BackendOptions):
            return options
        if not isinstance(options, Mapping):
            raise TypeError(f"qcompiler options must be a dict, got {type(options).__name__}")
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(
                f"unknown qcompiler option(s) {', '.join(map(repr, unknown))}; valid options are: "
                f"{', '.join(valid)}"
            )
        if options.get("artifact") is not None and ({"recipe", "stats"} & set(options)):
            raise ValueError("option 'artifact' brings its own recipe and statistics: do not pass 'recipe' or "
                             "'stats' with it")
        return cls(**options)


# --- recipes as JSON (artifacts, manifests) --------------------------------------------------------

_JSON_TYPES = {cls.__name__: cls for cls in (WeightScheme, ActivationScheme, LayerOverride, SmoothQuant,
                                              OutlierSplit, MixedInt8, GPTQ, AWQ, HQQ, Recipe)}


def recipe_to_json(value):
    """A recipe (or any of its parts) as plain JSON data: ``{"type": ..., field: ...}``."""
    if isinstance(value, tuple(_JSON_TYPES.values())):
        out = {"type": type(value).__name__}
        for f in fields(value):
            out[f.name] = recipe_to_json(getattr(value, f.name))
        return out
    if isinstance(value, (tuple, list)):
        return [recipe_to_json(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot write {type(value).__name__} into a recipe JSON")


def recipe_from_json(data):
    """Inverse of :func:`recipe_to_json`; validates through the dataclasses' own checks."""
    if isinstance(data, dict):
        kind = data.get("type")
        if kind not in _JSON_TYPES:
            raise ValueError(f"unknown recipe part {kind!r} in recipe JSON")
        cls = _JSON_TYPES[kind]
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names - {"type"}
        if unknown:
            raise ValueError(f"recipe JSON: {kind} has no field(s) {sorted(unknown)}")
        kwargs = {k: recipe_from_json(v) for k, v in data.items() if k != "type"}
        for k, v in kwargs.items():
            if isinstance(v, list):
                kwargs[k] = tuple(v)
        return cls(**kwargs)
    if isinstance(data, list):
        return [recipe_from_json(v) for v in data]
    return data
