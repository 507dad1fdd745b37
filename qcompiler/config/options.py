"""The backend's ``options=``: plain data, validated when built, with no I/O (the backend loads the
statistics and artifacts the options name)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from qcompiler.config.presets import DEFAULT_RECIPE, PRESETS, resolve_recipe
from qcompiler.config.recipe import Recipe
from qcompiler.config.schemes import _check_choice
from qcompiler.core.errors import ConfigError, ConfigTypeError

KERNEL_CHOICES = ("fast", "reference")
COMPILER_CHOICES = ("inductor", "eager")


@dataclass(frozen=True)
class BackendOptions:
    """The ``options=`` of ``torch.compile(model, backend="qcompiler", options=...)``.

    recipe:  preset name or :class:`Recipe` (default ``w8a8-dynamic``).
    kernels: ``"fast"`` lowers quantized linears to integer kernels; ``"reference"`` leaves the
             quantize/dequantize graph as written (slow, for checking the kernels against).
    stats:   calibration statistics (or their folder) for recipes with static activation ranges
             or GPTQ/AWQ rounding.
    debug:   a folder to write pass-by-pass dumps to (``qcompiler/dump.py``); also ``QCOMPILER_DUMP``.
    artifact: a folder written by ``qcompiler quantize`` (``qcompiler/artifact.py``): its recipe,
             statistics and saved tensors are used, nothing is recalibrated.
    other_weights: apply statistics or an artifact made from other float weights than the model's
             (same names and shapes: another checkpoint or fine-tune), on purpose; by default that is an
             error, found from the weights' fingerprints the folder recorded.
    compiler: ``"inductor"`` (default) compiles the quantized graph with Inductor (fused, fast);
             ``"eager"`` runs it op by op as PyTorch's eager mode would: the same passes, lowering and
             kernels, seconds to compile instead of a minute or two on a 135M model, for accuracy work
             (perplexity, sweeps). Its speed is not qcompiler's: time the Inductor build.

    Folders are loaded (and verified) by the backend when it compiles the first graph
    (``qcompiler.backend.resolve``), not here: building options reads no file.
    """

    recipe: Recipe = field(default_factory=lambda: PRESETS[DEFAULT_RECIPE])
    kernels: str = "fast"
    stats: object = None  # CalibrationStats or a folder written by CalibrationStats.save
    debug: object = None  # str or Path
    artifact: object = None  # a folder written by `qcompiler quantize` (or an artifact.Artifact)
    other_weights: bool = False
    compiler: str = "inductor"

    def __post_init__(self) -> None:
        object.__setattr__(self, "recipe", resolve_recipe(self.recipe))
        _check_choice(self.kernels, KERNEL_CHOICES, "option 'kernels'")
        _check_choice(self.compiler, COMPILER_CHOICES, "option 'compiler'")
        if not isinstance(self.other_weights, bool):
            raise ConfigTypeError(f"option 'other_weights' must be True or False, got {self.other_weights!r}")
        for name in ("debug", "artifact"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike)) and not (
                    name == "artifact" and hasattr(value, "manifest")):
                raise ConfigTypeError(f"option {name!r} must be a folder path, got {type(value).__name__}")
        if self.artifact is None and self.stats is None and self.recipe.needs_calibration:
            raise ConfigError(needs_stats_message(self.recipe))

    @classmethod
    def from_user(cls, options: Mapping | None) -> BackendOptions:
        if options is None:
            return cls()
        if isinstance(options, BackendOptions):
            return options
        if not isinstance(options, Mapping):
            raise ConfigTypeError(f"qcompiler options must be a dict, got {type(options).__name__}")
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ConfigError(
                f"unknown qcompiler option(s) {', '.join(map(repr, unknown))}; valid options are: "
                f"{', '.join(valid)}"
            )
        if options.get("artifact") is not None and ({"recipe", "stats"} & set(options)):
            raise ConfigError("option 'artifact' brings its own recipe and statistics: do not pass 'recipe' or "
                             "'stats' with it")
        return cls(**options)


def needs_stats_message(recipe: Recipe) -> str:
    why = ("rounds weights on calibration data (GPTQ/AWQ)" if recipe.data_driven_rounding
           else "quantizes activations with static ranges")
    return (f"recipe {recipe.name!r} {why} and needs calibration statistics: stats = qcompiler.calibrate(model, "
            "batches, recipe), then options={'recipe': ..., 'stats': stats} (or a folder saved with stats.save(path))")
