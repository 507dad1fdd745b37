"""Per-layer quantization schemes: how a linear's weight and its input activation are quantized."""

from __future__ import annotations

from dataclasses import dataclass, replace

from qcompiler.core import primitives
from qcompiler.core.errors import ConfigError, ConfigTypeError
from qcompiler.core.ranges import OBSERVERS, WEIGHT_OBSERVERS

WEIGHT_GRANULARITIES = ("per_channel", "per_group", "per_tensor")
ACTIVATION_GRANULARITIES = ("per_token", "per_tensor")


def _check_bits(bits: int, what: str) -> None:
    if not isinstance(bits, int) or bits not in primitives.SUPPORTED_BITS:
        raise ConfigError(f"{what}.bits must be an integer from 2 to 8, got {bits!r}")


def _check_percentile(value: float, what: str) -> None:
    if not isinstance(value, (int, float)) or not 50.0 < value <= 100.0:
        raise ConfigError(f"{what}.percentile must be in (50, 100], e.g. 99.99; got {value!r}")


def _check_choice(value: str, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise ConfigError(f"{what} must be one of {', '.join(choices)}; got {value!r}")


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
    # scales exactly representable in fp16 (rounded before the integers are chosen) and, asymmetric, the
    # offsets -zero_point * scale too: what GGUF's blocks store (d, m as fp16), so an export is exact
    fp16_scales: bool = False
    # symmetric weights on all 2^b levels [-2^(b-1), 2^(b-1) - 1] as llama.cpp's Q4_0 rounds them: the value of
    # largest magnitude lands on -2^(b-1) (the scale takes its sign, so it may be negative), the other side is
    # clamped at 2^(b-1) - 1; False: the restricted range [-(2^(b-1) - 1), 2^(b-1) - 1], scale absmax / qmax
    full_range: bool = False

    def __post_init__(self) -> None:
        _check_bits(self.bits, "WeightScheme")
        for flag in ("fp16_scales", "full_range"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"WeightScheme.{flag} must be True or False, got {getattr(self, flag)!r}")
        if self.full_range and (not self.symmetric or self.bits > 4):
            raise ConfigError("WeightScheme.full_range applies to symmetric weights of 2 to 4 bits (int8 weights use "
                             f"[-127, 127], what the int8 kernels and GGUF Q8_0 take); got bits={self.bits}, "
                             f"symmetric={self.symmetric}")
        _check_choice(self.granularity, WEIGHT_GRANULARITIES, "WeightScheme.granularity")
        _check_choice(self.observer, WEIGHT_OBSERVERS, "WeightScheme.observer")
        if self.observer == "kl" and self.granularity == "per_group":
            raise ConfigError("WeightScheme.observer='kl' searches a histogram per block in Python and is offered per "
                             "channel or per tensor only; for per-group weights use 'mse' (or HQQ/GPTQ/AWQ rounding)")
        _check_percentile(self.percentile, "WeightScheme")
        if self.granularity == "per_group":
            if not isinstance(self.group_size, int) or self.group_size < 1:
                raise ConfigError(
                    f"WeightScheme with granularity 'per_group' needs a positive group_size, got "
                    f"{self.group_size!r}"
                )
        elif self.group_size is not None:
            raise ConfigError(
                f"group_size={self.group_size} only applies to granularity 'per_group', not "
                f"{self.granularity!r}"
            )
        if self.fit_group and self.granularity != "per_group":
            raise ConfigError(f"fit_group=True only applies to granularity 'per_group', not {self.granularity!r}")

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
        if self.full_range:
            return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
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
        half = " fp16-scales" if self.fp16_scales else ""
        sym = ("sym-full" if self.full_range else "sym") if self.symmetric else "asym"
        return f"int{self.bits} {gran} {sym}{obs}{half}"


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
            raise ConfigError(
                f"observer {self.observer!r} selects a static range; dynamic activations take each input's "
                "min/max at run time. Use dynamic=False for a calibrated range."
            )
        if not self.dynamic and self.granularity != "per_tensor":
            raise ConfigError(
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
            raise ConfigError("LayerOverride.pattern must be a non-empty module-name pattern")
        if self.weight is not None and not isinstance(self.weight, WeightScheme):
            raise ConfigTypeError(f"LayerOverride.weight must be a WeightScheme or None, got {type(self.weight).__name__}")
        if self.activation is not None and not isinstance(self.activation, ActivationScheme):
            raise ConfigTypeError(
                f"LayerOverride.activation must be an ActivationScheme or None, got {type(self.activation).__name__}"
            )
        if self.weight_only and self.activation is not None:
            raise ConfigError("LayerOverride: give either an activation scheme or weight_only=True, not both")
