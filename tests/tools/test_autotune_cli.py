"""``qcompiler autotune``: errors before any work, then a recipe folder that loads, and a cached rerun."""

import json

import pytest

from qcompiler.config import Recipe, recipe_from_json
from qcompiler.tools import cli, models

QUICK = ["--samples", "1", "--seq-len", "32", "--candidates", "float", "w8-channel", "w4-g64"]


@pytest.mark.parametrize("extra, message", [
    (["--target-bpw", "0"], "target_bpw must be a positive number"),
    (["--target-bpw", "5", "--candidates", "w5"], "unknown candidate 'w5'"),
    (["--target-bpw", "5", "--rounding", "hqq", "--candidates", "float", "w8-channel"], "no candidate has asymmetric"),
    (["--target-bpw", "5", "--samples", "0"], "--samples must be at least 1"),
    (["--target-bpw", "5", "--max-latency-ratio", "0"], "max_latency_ratio must be a positive number"),
    (["--target-bpw", "5", "--calib-text", "/nonexistent/valid.txt"], "calibration text /nonexistent/valid.txt"),
])
def test_bad_arguments_are_errors_before_the_model_loads(extra, message, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded the model before checking"))
    assert cli.main(["autotune", "--model", "stories260k", "--out", str(tmp_path / "o"), *extra]) == 2
    assert message in capsys.readouterr().err


def test_an_occupied_out_is_refused_before_any_work(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded the model before checking"))
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "x").write_text("mine")
    assert cli.main(["autotune", "--model", "stories260k", "--target-bpw", "10", "--out", str(tmp_path / "o")]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err


def test_autotune_writes_a_recipe_that_loads_and_a_rerun_reads_the_cache(capsys, tmp_path):
    cache = tmp_path / "stats"
    args = ["autotune", "--model", "stories260k", "--target-bpw", "10.5", "--cache", str(cache), *QUICK]
    assert cli.main([*args, "--out", str(tmp_path / "a")]) == 0
    recipe = recipe_from_json(json.loads((tmp_path / "a" / "recipe.json").read_text()))
    result = json.loads((tmp_path / "a" / "autotune.json").read_text())
    assert isinstance(recipe, Recipe) and recipe.name == result["recipe_name"] == "auto-10.5bpw"
    assert result["bits_per_weight"] <= 10.5 and result["bits"] <= 10.5 * result["weights"]
    assert {layer["candidate"] for layer in result["layers"]} <= {"float", "w8-channel", "w4-g64"}
    assert result["arguments"]["target_bpw"] == 10.5 and result["arguments"]["candidates"] == QUICK[-3:]
    assert "measuring w4-g64" in capsys.readouterr().err
    assert cli.main([*args, "--out", str(tmp_path / "b")]) == 0
    err = capsys.readouterr().err
    assert "measuring" not in err  # every number came from the cache
    again = json.loads((tmp_path / "b" / "autotune.json").read_text())
    assert again["layers"] == result["layers"]
    assert {layer["module"] for layer in result["layers"]} >= {"(embeddings)", "lm_head"}
    assert cli.main([*args[:4], "4", *args[5:], "--out", str(tmp_path / "c")]) == 2
    assert "is below the least this model can take" in capsys.readouterr().err
    # without the embedding table (tied to the LM head, so its float bits stay) 8.5 bits are below the least (8.82)
    assert cli.main([*args[:4], "8.5", *args[5:], "--no-embeddings", "--out", str(tmp_path / "c")]) == 2
    assert "is below the least this model can take" in capsys.readouterr().err


def test_autotune_with_gptq_writes_the_recipes_statistics_and_eval_compiles_with_them(capsys, tmp_path):
    out = tmp_path / "g"
    assert cli.main(["autotune", "--model", "stories260k", "--target-bpw", "8", "--rounding", "gptq",
                     "--cache", str(tmp_path / "cache"), "--out", str(out), *QUICK]) == 0
    err = capsys.readouterr().err
    assert "calibrating uniform-w4-g64 (GPTQ rounding)" in err and f"--stats {out / 'stats'}" in err
    recipe = recipe_from_json(json.loads((out / "recipe.json").read_text()))
    assert type(recipe.rounding).__name__ == "GPTQ" and (out / "stats").is_dir()
    assert cli.main(["eval", "--model", "stories260k", "--recipe", str(out), "--stats", str(out / "stats"),
                     "--tokens", "256", "--window", "128", "--no-speed", "--json", str(tmp_path / "e.json")]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    searched = json.loads((out / "autotune.json").read_text())["bits_per_weight"]
    assert result["weight_bytes"]["bits_per_weight"] == pytest.approx(searched, rel=1e-12)
