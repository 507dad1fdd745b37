"""Configuration: frozen dataclasses, validated when built, passed explicitly, doing no I/O.

``schemes`` (per-layer weight/activation schemes), ``methods`` (SmoothQuant, outlier splitting,
LLM.int8(), GPTQ, AWQ, HQQ, Rotation), ``recipe`` (:class:`Recipe`), ``presets`` (named recipes),
``options`` (the backend's :class:`BackendOptions`), ``serialization`` (recipes as JSON).
"""

from qcompiler.config.methods import AWQ, GPTQ, HQQ, ROUNDINGS, MixedInt8, OutlierSplit, Rotation, SmoothQuant
from qcompiler.config.options import KERNEL_CHOICES, BackendOptions, needs_stats_message
from qcompiler.config.presets import DEFAULT_RECIPE, LM_HEAD_INT8, PRESETS, resolve_recipe, with_int8_lm_head
from qcompiler.config.recipe import Recipe
from qcompiler.config.schemes import (
    ACTIVATION_GRANULARITIES,
    WEIGHT_GRANULARITIES,
    ActivationScheme,
    LayerOverride,
    LayerScheme,
    WeightScheme,
)
from qcompiler.config.serialization import recipe_from_json, recipe_to_json

__all__ = [
    "ACTIVATION_GRANULARITIES", "AWQ", "DEFAULT_RECIPE", "GPTQ", "HQQ", "KERNEL_CHOICES", "PRESETS", "ROUNDINGS",
    "WEIGHT_GRANULARITIES", "ActivationScheme", "BackendOptions", "LayerOverride", "LayerScheme", "MixedInt8",
    "OutlierSplit", "Recipe", "Rotation", "SmoothQuant", "WeightScheme", "needs_stats_message", "recipe_from_json",
    "recipe_to_json", "resolve_recipe", "with_int8_lm_head", "LM_HEAD_INT8",
]
