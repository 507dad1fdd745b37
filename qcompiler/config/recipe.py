"""A :class:`Recipe`: what to quantize and how, per linear layer (found by module name)."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from qcompiler.config.methods import AWQ, GPTQ, HQQ, ROUNDINGS, MixedInt8, OutlierSplit, Rotation, SmoothQuant
from qcompiler.config.schemes import ActivationScheme, LayerOverride, LayerScheme, WeightScheme
from qcompiler.core.errors import ConfigError, ConfigTypeError


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
    rounding: GPTQ | AWQ | HQQ | None = None  # None: round to nearest; HQQ: asymmetric layers (symmetric: nearest)
    rotation: Rotation | None = None  # data-free: runs before every statistic is gathered
    # every token/position embedding table on a parameter, weight-only (its rows per channel or in groups
    # along the hidden size; scales and offsets stored as fp16); None keeps the tables float
    embedding: WeightScheme | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.weight, WeightScheme):
            raise ConfigTypeError(f"Recipe.weight must be a WeightScheme, got {type(self.weight).__name__}")
        if self.activation is not None and not isinstance(self.activation, ActivationScheme):
            raise ConfigTypeError(
                f"Recipe.activation must be an ActivationScheme or None, got {type(self.activation).__name__}"
            )
        if isinstance(self.skip, str) or not all(isinstance(p, str) for p in self.skip):
            raise ConfigTypeError("Recipe.skip must be a tuple of module-name patterns, e.g. ('lm_head',)")
        object.__setattr__(self, "skip", tuple(self.skip))
        if isinstance(self.overrides, LayerOverride) or not all(isinstance(o, LayerOverride) for o in self.overrides):
            raise ConfigTypeError("Recipe.overrides must be a tuple of LayerOverride")
        object.__setattr__(self, "overrides", tuple(self.overrides))
        for name, kind in (("smoothquant", SmoothQuant), ("split_outliers", OutlierSplit), ("mixed_int8", MixedInt8)):
            value = getattr(self, name)
            if value is not None and not isinstance(value, kind):
                raise ConfigTypeError(f"Recipe.{name} must be a {kind.__name__} or None, got {type(value).__name__}")
        if self.rotation is not None and not isinstance(self.rotation, Rotation):
            raise ConfigTypeError(f"Recipe.rotation must be a Rotation or None, got {type(self.rotation).__name__}")
        if self.rounding is not None and not isinstance(self.rounding, ROUNDINGS):
            raise ConfigTypeError(f"Recipe.rounding must be GPTQ(), AWQ(), HQQ() or None (round to nearest), got "
                            f"{type(self.rounding).__name__}")
        if self.rounding is not None and (self.split_outliers is not None or self.mixed_int8 is not None):
            raise ConfigError("Recipe: GPTQ/AWQ/HQQ rounding cannot be combined with outlier splitting or LLM.int8() "
                             "in one recipe (they change the layers' widths); use one or the other")
        if self.smoothquant is not None and self.rounding is not None and not isinstance(self.rounding, GPTQ):
            raise ConfigError(f"Recipe: SmoothQuant combines with GPTQ rounding only (the smoothed weights are rounded "
                             f"by GPTQ on the smoothed inputs), not with {type(self.rounding).__name__}: AWQ scales "
                             "the same channels itself; use SmoothQuant with GPTQ() or round to nearest")
        if self.embedding is not None:
            if not isinstance(self.embedding, WeightScheme):
                raise ConfigTypeError(f"Recipe.embedding must be a WeightScheme or None, got "
                                      f"{type(self.embedding).__name__}")
            if self.embedding.granularity == "per_tensor":
                raise ConfigError("Recipe.embedding: an embedding table is quantized per row (granularity "
                                  "'per_channel') or in groups along the hidden size ('per_group'), not per tensor")
            if self.embedding.full_range:
                raise ConfigError("Recipe.embedding: full_range (the Q4_0 grid) is offered for linear weights only")
        weights = [self.weight] + [o.weight for o in self.overrides if o.weight is not None]
        if isinstance(self.rounding, HQQ) and all(w.symmetric for w in weights):
            raise ConfigError("Recipe: HQQ optimizes the zero point, so it needs asymmetric weights "
                             "(WeightScheme(symmetric=False)) in the recipe or an override; layers with symmetric "
                             "weights round to nearest")

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
        """Identifies what GPTQ/AWQ results depend on: the method, the weight schemes, the skip list (and the
        transforms before the rounding, when there are any)."""
        key = (self.rounding, self.weight, tuple((o.pattern, o.weight) for o in self.overrides), self.skip)
        key += (self.transforms,) if self.transforms else ()
        return repr(key + (self.rotation,) if self.rotation is not None else key)

    def transform_fingerprint(self) -> str:
        """Identifies the transforms (and the skip list) that statistics after transforms depend on."""
        return repr((self.transforms, self.skip))
