"""``--recipe FILE``: every command takes a saved recipe (a JSON file, or autotune's folder holding
recipe.json) as it takes a preset; bad files are errors naming the file, before any model is loaded."""

import json
from dataclasses import replace

import pytest
from safetensors import safe_open

from qcompiler.config import PRESETS, LayerOverride, OutlierSplit, Recipe, WeightScheme, recipe_to_json
from qcompiler.tools import cli, models
from qcompiler.tools.recipe_files import labelled_recipes, recipe_argument

INT8 = WeightScheme(bits=8, granularity="per_channel", symmetric=True)
# what autotune writes for a mix of w8a8-dynamic, w8-channel and float layers: W8A8 dynamic by default,
# the value projections int8 weight-only, one down projection float (by its exact name in skip)
MIXED = Recipe(name="mixed-by-hand", skip=("*embed*", "lm_head", "model.layers.0.mlp.down_proj"),
               overrides=(LayerOverride("model.layers.*.self_attn.v_proj", weight=INT8, weight_only=True),))


@pytest.fixture
def recipe_dir(tmp_path):
    folder = tmp_path / "auto"
    folder.mkdir()
    (folder / "recipe.json").write_text(json.dumps(recipe_to_json(MIXED), indent=1))
    return folder


def test_presets_files_and_folders_resolve_to_the_same_recipe(recipe_dir):
    assert recipe_argument("w8a8-dynamic") is PRESETS["w8a8-dynamic"]
    assert recipe_argument(str(recipe_dir)) == recipe_argument(str(recipe_dir / "recipe.json")) == MIXED
    labels = labelled_recipes(["w4a16-rtn", str(recipe_dir), str(recipe_dir / "recipe.json"), "w4a16-rtn"])
    assert labels == {"w4a16-rtn": PRESETS["w4a16-rtn"], "mixed-by-hand": MIXED,
                      str(recipe_dir / "recipe.json"): MIXED}  # a second recipe of one name goes by its path


BAD_FILES = {  # file content -> what the error says
    "{not json": "is not JSON",
    json.dumps(recipe_to_json(INT8)): "does not hold a recipe",
    json.dumps([recipe_to_json(MIXED)]): "does not hold a recipe",
    json.dumps({**recipe_to_json(MIXED), "colour": "red"}): "has no field(s) ['colour']",
    json.dumps({**recipe_to_json(MIXED), "skip": "lm_head"}): "Recipe.skip must be a tuple",
    json.dumps({**recipe_to_json(MIXED), "weight": {**recipe_to_json(INT8), "bits": 1}}): "invalid recipe",
    json.dumps({**recipe_to_json(MIXED), "weight": {"type": "Pickle"}}): "unknown recipe part 'Pickle'",
}


@pytest.mark.parametrize("content", list(BAD_FILES))
def test_a_bad_recipe_file_is_an_error_naming_it(content, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded the model before checking"))
    path = tmp_path / "recipe.json"
    path.write_text(content)
    assert cli.main(["explain", "--model", "stories260k", "--recipe", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"recipe file {path}" in err and BAD_FILES[content] in err


def _commands(recipe: str, out: str) -> dict[str, list[str]]:
    model = ["--model", "stories260k"]
    return {
        "eval": ["eval", *model, "--recipe", recipe],
        "explain": ["explain", *model, "--recipe", recipe],
        "quantize": ["quantize", *model, "--recipe", recipe, "--out", out],
        "calibrate": ["calibrate", *model, "--recipe", recipe, "--out", out],
        "export": ["export", *model, "--recipe", recipe, "--format", "compressed-tensors", "--out", out],
        "generate": ["generate", *model, "--recipe", recipe, "--prompt", "Once"],
        "report": ["report", *model, "--recipe", recipe, "--out", out],
        "report --recipes": ["report", *model, "--out", out, "--recipes", "w4a16-rtn", recipe],
        "bench generate": ["bench", "generate", *model, "--recipes", recipe],
    }


@pytest.mark.parametrize("command", list(_commands("", "")))
def test_every_command_reads_the_recipe_file_before_any_work(command, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded the model before checking"))
    out = str(tmp_path / "out")
    assert cli.main(_commands(str(tmp_path / "absent.json"), out)[command]) == 2
    assert f"recipe file {tmp_path / 'absent.json'} not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli.main(_commands(str(tmp_path / "empty"), out)[command]) == 2
    assert f"recipe folder {tmp_path / 'empty'} holds no recipe.json" in capsys.readouterr().err
    assert cli.main(_commands("w3a3-magic", out)[command]) == 2
    assert "unknown recipe 'w3a3-magic'" in capsys.readouterr().err


def test_explain_prints_the_plan_of_a_recipe_folder(recipe_dir, capsys):
    assert cli.main(["explain", "--model", "stories260k", "--recipe", str(recipe_dir), "--no-errors"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("recipe mixed-by-hand: 34 linear layers quantized, 2 kept in float")
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("model.")}
    assert "A: int8 dynamic per_token" in rows["model.layers.1.self_attn.q_proj"]
    assert "A: float activations" in rows["model.layers.1.self_attn.v_proj"]
    assert "skipped by the recipe's skip pattern 'model.layers.0.mlp.down_proj'" in rows["model.layers.0.mlp.down_proj"]
    assert "A: int8 dynamic per_token" in rows["model.layers.1.mlp.down_proj"]


def test_export_writes_a_recipe_files_mixed_precision_as_compressed_tensors(recipe_dir, tmp_path, capsys):
    out = tmp_path / "ct"
    assert cli.main(["export", "--model", "stories260k", "--recipe", str(recipe_dir / "recipe.json"),
                     "--format", "compressed-tensors", "--out", str(out)]) == 0
    assert "34 quantized linear layers" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["format"] == "mixed-precision"
    assert "model.layers.0.mlp.down_proj" in config["ignore"]
    groups = {g["format"]: g for g in config["config_groups"].values()}
    assert set(groups) == {"int-quantized", "pack-quantized"}
    assert groups["int-quantized"]["input_activations"]["dynamic"] is True
    assert groups["pack-quantized"]["weights"]["num_bits"] == 8 and groups["pack-quantized"]["input_activations"] is None
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    layer = "model.layers.1."
    assert {layer + "self_attn.q_proj.weight", layer + "self_attn.v_proj.weight_packed"} <= names
    assert "model.layers.0.mlp.down_proj.weight" in names and "model.layers.0.mlp.down_proj.weight_scale" not in names


@pytest.mark.parametrize("recipe, extra, message", [
    (MIXED, ["--format", "gguf", "--gguf-type", "Q8_0"], "have float32 scales, and GGUF stores fp16 scales"),
    (replace(PRESETS["w8a16-q8_0"], name="q8-by-hand", activation=MIXED.activation), ["--format", "gguf"],
     "--format gguf needs --gguf-type"),
    (replace(PRESETS["w8a8-static"], name="ocs-by-hand", split_outliers=OutlierSplit()),
     ["--format", "compressed-tensors"], "recipe 'ocs-by-hand' uses outlier channel splitting"),
])
def test_export_checks_a_recipe_file_before_any_work(recipe, extra, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded the model before checking"))
    path = tmp_path / "r.json"
    path.write_text(json.dumps(recipe_to_json(recipe)))
    assert cli.main(["export", "--model", "stories260k", "--recipe", str(path), "--out", str(tmp_path / "o"),
                     *extra]) == 2
    assert message in capsys.readouterr().err
