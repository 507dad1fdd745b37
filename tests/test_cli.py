import pytest

from qcompiler import cli


def test_unknown_recipe_is_reported_with_the_presets(capsys):
    assert cli.main(["eval", "--model", "stories260k", "--recipe", "w3a3-magic"]) == 2
    err = capsys.readouterr().err
    assert "unknown recipe 'w3a3-magic'" in err and "w8a8-dynamic" in err and "w8a8-static-mse" in err


def test_missing_text_file_is_reported(capsys, tmp_path):
    assert cli.main(["eval", "--model", "stories260k", "--text", str(tmp_path / "nope.txt")]) == 2
    assert "not found" in capsys.readouterr().err


def test_unknown_model_is_reported(capsys):
    assert cli.main(["calibrate", "--model", "no-such-model", "--out", "x"]) == 2
    assert "neither an alias" in capsys.readouterr().err


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(command in out for command in ("eval", "demo", "calibrate"))
