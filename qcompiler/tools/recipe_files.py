"""The command line's ``--recipe`` and ``--recipes``: a preset name, a recipe JSON file, or a folder holding
``recipe.json`` (what ``qcompiler autotune --out DIR`` writes).

    qcompiler autotune --model stories260k --target-bpw 11 --out auto/
    qcompiler explain --model stories260k --recipe auto/            # = --recipe auto/recipe.json

A preset name wins over a file or folder of the same name. A file is read as JSON (never pickle), must hold
one ``{"type": "Recipe", ...}`` object as ``recipe_to_json`` writes it, and is validated by the recipe's
own dataclasses; anything else is an error naming the file, raised before the command loads a model.
"""

from __future__ import annotations

import json
from pathlib import Path

from qcompiler.config import PRESETS, Recipe, recipe_from_json
from qcompiler.core.errors import ConfigError, InputFileError, QCompilerError
from qcompiler.core.files import read_text

RECIPE_FILE = "recipe.json"  # the name ``qcompiler autotune`` writes in its --out folder


def recipe_argument(value: str | Recipe) -> Recipe:
    """The recipe ``value`` names: a preset, a recipe JSON file, or a folder holding ``recipe.json``."""
    if isinstance(value, Recipe):
        return value
    if value in PRESETS:
        return PRESETS[value]
    path = Path(value)
    if not path.exists():
        if value.endswith(".json") or "/" in value or "\\" in value:  # meant as a file
            raise InputFileError(f"recipe file {path} not found (and {value!r} is not a preset name)")
        raise ConfigError(f"unknown recipe {value!r}: not a preset ({', '.join(sorted(PRESETS))}), nor an existing "
                          f"recipe JSON file or folder holding {RECIPE_FILE}")
    if path.is_dir():
        if not (path / RECIPE_FILE).is_file():
            raise InputFileError(f"recipe folder {path} holds no {RECIPE_FILE} (the file `qcompiler autotune "
                                 "--out` writes): give a preset name or a recipe JSON file")
        path = path / RECIPE_FILE
    return read_recipe_file(path)


def labelled_recipes(values: list[str], taken: tuple[str, ...] = (), calibration_free: bool = False
                     ) -> dict[str, Recipe]:
    """Each of ``values`` read by :func:`recipe_argument`, labelled by the recipe's name, or by the value as
    given (a file's path) where another recipe or ``taken`` has that name; a value given twice counts once.
    ``calibration_free``: a recipe that needs statistics is an error."""
    out: dict[str, Recipe] = {}
    for value in values:
        recipe = recipe_argument(value)
        if calibration_free and recipe.needs_calibration:
            raise ConfigError(f"--recipes takes calibration-free recipes only; {value} needs statistics")
        label = recipe.name if recipe.name not in (*taken, *out) else value
        if label not in (*taken, *out):
            out[label] = recipe
    return out


def read_recipe_file(path: str | Path) -> Recipe:
    """The :class:`Recipe` saved as JSON in ``path``; an error naming the file when it is not one."""
    path = Path(path)
    text = read_text(path, "recipe file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputFileError(f"recipe file {path} is not JSON ({exc.msg} at line {exc.lineno}, column "
                             f"{exc.colno})") from exc
    if not isinstance(data, dict) or data.get("type") != "Recipe":
        kind = data.get("type") if isinstance(data, dict) else type(data).__name__
        raise ConfigError(f"recipe file {path} does not hold a recipe: expected a JSON object with \"type\": "
                          f"\"Recipe\" (as `qcompiler autotune` and recipe_to_json write), found {kind!r}")
    try:
        return recipe_from_json(data)
    except (QCompilerError, TypeError, ValueError) as exc:  # the dataclasses' own checks on the user's data
        raise ConfigError(f"recipe file {path} holds an invalid recipe: {exc}") from exc
