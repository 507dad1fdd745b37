"""Recipes as JSON (artifacts, manifests, saved automatic recipes): ``{"type": ..., field: ...}``."""

from __future__ import annotations

from dataclasses import fields

from qcompiler.config.methods import AWQ, GPTQ, HQQ, MixedInt8, OutlierSplit, Rotation, SmoothQuant
from qcompiler.config.recipe import Recipe
from qcompiler.config.schemes import ActivationScheme, LayerOverride, WeightScheme
from qcompiler.core.errors import ConfigError, ConfigTypeError

_JSON_TYPES = {cls.__name__: cls for cls in (WeightScheme, ActivationScheme, LayerOverride, SmoothQuant,
                                              OutlierSplit, MixedInt8, GPTQ, AWQ, HQQ, Rotation, Recipe)}


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
    raise ConfigTypeError(f"cannot write {type(value).__name__} into a recipe JSON")


def recipe_from_json(data):
    """Inverse of :func:`recipe_to_json`; validates through the dataclasses' own checks."""
    if isinstance(data, dict):
        kind = data.get("type")
        if kind not in _JSON_TYPES:
            raise ConfigError(f"unknown recipe part {kind!r} in recipe JSON")
        cls = _JSON_TYPES[kind]
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names - {"type"}
        if unknown:
            raise ConfigError(f"recipe JSON: {kind} has no field(s) {sorted(unknown)}")
        kwargs = {k: recipe_from_json(v) for k, v in data.items() if k != "type"}
        for k, v in kwargs.items():
            if isinstance(v, list):
                kwargs[k] = tuple(v)
        return cls(**kwargs)
    if isinstance(data, list):
        return [recipe_from_json(v) for v in data]
    return data
