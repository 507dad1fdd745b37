import pytest

from qcompiler.tools import cli


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


def test_static_eval_calibrates_on_the_fly_like_calibrate_then_eval_with_stats(tmp_path, capsys):
    import json
    import math

    from qcompiler.calibration.stats import CalibrationStats
    from qcompiler.tools import models

    calib = ["--calib-text", str(models.default_calibration_text()), "--samples", "2", "--seq-len", "32"]
    scoring = ["--tokens", "256", "--window", "64", "--no-speed"]
    eval_args = ["eval", "--model", "stories260k", "--recipe", "w8a8-static"] + scoring
    assert cli.main(eval_args + calib + ["--json", str(tmp_path / "fly.json")]) == 0
    assert cli.main(["calibrate", "--model", "stories260k", "--recipe", "w8a8-static", "--out", str(tmp_path / "stats"),
                     "--text", calib[1], "--samples", "2", "--seq-len", "32"]) == 0
    assert "wrote statistics of 35 layers" in capsys.readouterr().out
    assert len(CalibrationStats.load(tmp_path / "stats").activations) == 35
    assert cli.main(eval_args + ["--stats", str(tmp_path / "stats"), "--json", str(tmp_path / "saved.json")]) == 0
    fly, saved = (json.loads((tmp_path / name).read_text()) for name in ("fly.json", "saved.json"))
    for result in (fly, saved):
        assert result["model"] == "stories260k" and result["recipe"] == "w8a8-static"
        assert {"float", "quantized", "speed", "weight_bytes", "layers", "calibration"} <= set(result)
        assert {"perplexity", "kl", "top1_agreement"} <= set(result["quantized"])
        assert result["speed"] == {}  # --no-speed
        assert result["layers"]["quantized"] == 35
        assert result["calibration"]["batches"] == 2 and result["calibration"]["tokens"] == 64
        assert math.isfinite(result["float"]["perplexity"]) and math.isfinite(result["quantized"]["perplexity"])
        assert result["weight_bytes"]["quantized"] < result["weight_bytes"]["float"]
    # the same calibration batches give the same statistics, hence the same quantized model
    assert fly["quantized"]["perplexity"] == saved["quantized"]["perplexity"]
    assert fly["quantized"]["kl"] == saved["quantized"]["kl"]
    assert fly["float"]["perplexity"] == saved["float"]["perplexity"]


def test_calibrate_channel_bins_writes_per_channel_histograms(tmp_path, capsys):
    from qcompiler.calibration.stats import CalibrationStats
    from qcompiler.tools import models

    assert cli.main(["calibrate", "--model", "stories260k", "--recipe", "w8a8-static", "--out", str(tmp_path / "s"),
                     "--text", str(models.default_calibration_text()), "--samples", "2", "--seq-len", "32",
                     "--channel-bins", "64"]) == 0
    stats = CalibrationStats.load(tmp_path / "s")
    assert stats.info["channel_bins"] == 64
    for ranges in stats.activations.values():
        assert ranges.channel_hist_counts.shape == (ranges.channel_min.numel(), 64)
        lo, hi = ranges.channel_range("percentile", 8, False, percentile=99.0)
        assert (lo <= 0).all() and (hi >= 0).all() and lo.shape == ranges.channel_min.shape
    assert cli.main(["calibrate", "--model", "stories260k", "--out", str(tmp_path / "bad"),
                     "--samples", "1", "--seq-len", "16", "--channel-bins", "100"]) == 2
    assert "power of two" in capsys.readouterr().err
