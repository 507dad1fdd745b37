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


@pytest.mark.inductor
def test_eval_runs_the_quantized_graph_eagerly_when_asked(tmp_path, monkeypatch):
    import json

    import torch

    called = []
    real = torch._inductor.compile_fx.compile_fx
    monkeypatch.setattr(torch._inductor.compile_fx, "compile_fx", lambda *a, **k: called.append(1) or real(*a, **k))
    scoring = ["--tokens", "256", "--window", "64", "--no-speed"]
    out = {}
    for compiler in ("eager", "inductor"):
        called.clear()
        assert cli.main(["eval", "--model", "stories260k", "--recipe", "w8a8-dynamic", "--compiler", compiler]
                        + scoring + ["--json", str(tmp_path / f"{compiler}.json")]) == 0
        out[compiler] = json.loads((tmp_path / f"{compiler}.json").read_text())
        assert out[compiler]["compiler"] == compiler and bool(called) == (compiler == "inductor")
    assert abs(out["eager"]["quantized"]["perplexity"] / out["inductor"]["quantized"]["perplexity"] - 1) < 1e-3


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


NO_MODEL = "no-such-model"  # a check that ran after loading would say "neither an alias" instead
_CALIBRATION = ("--samples", "--seq-len")
NUMERIC = [  # (command, options): each is checked before any work, the model included
    (["eval", "--model", NO_MODEL], ("--tokens", "--window", "--repeats", "--threads") + _CALIBRATION),
    (["demo"], ("--tokens", "--window", "--repeats", "--threads")),
    (["calibrate", "--model", NO_MODEL, "--out", "x"], ("--channel-bins",) + _CALIBRATION),
    (["quantize", "--model", NO_MODEL, "--out", "x"], ("--tokens",) + _CALIBRATION),
    (["explain", "--model", NO_MODEL], ("--tokens", "--top") + _CALIBRATION),
    (["report", "--model", NO_MODEL, "--out", "r"], ("--tokens",) + _CALIBRATION),
    (["export", "--model", NO_MODEL, "--format", "compressed-tensors", "--out", "e"], ("--tokens",) + _CALIBRATION),
    (["generate", "--model", NO_MODEL, "--prompt", "hi"],
     ("--max-new-tokens", "--max-cache-len", "--threads") + _CALIBRATION),
    (["bench", "kernels"], ("--repeats", "--threads")),
    (["bench", "generate", "--model", NO_MODEL], ("--prefill", "--depth", "--decode", "--threads", "--repeats")),
]


@pytest.mark.parametrize("command,option", [(c, o) for c, options in NUMERIC for o in options],
                         ids=lambda v: " ".join(w for w in v[:2] if not w.startswith("-")) if isinstance(v, list) else v)
@pytest.mark.parametrize("value", ["0", "-1"])
def test_numeric_options_below_their_least_value_are_clear_errors(command, option, value, capsys, tmp_path,
                                                                  monkeypatch):
    monkeypatch.chdir(tmp_path)
    if option in ("--top", "--channel-bins") and value == "0":
        pytest.skip("0 is a valid value (no attribution / no per-channel histograms)")
    assert cli.main([*command, option, value]) == 2
    err = capsys.readouterr().err
    assert f"qcompiler: {option} must be at least" in err and f"got {value}" in err and "Traceback" not in err


@pytest.mark.parametrize("args,message", [
    (["generate", "--model", NO_MODEL, "--prompt", "hi", "--temperature", "-1"], "--temperature must be 0 (greedy)"),
    (["generate", "--model", NO_MODEL, "--prompt", "hi", "--temperature", "-0.5"], "got -0.5"),
    (["generate", "--model", NO_MODEL, "--prompt", "hi", "--temperature", "nan"], "--temperature must be 0 (greedy)"),
    (["bench", "kernels", "--peak-gbps", "0"], "--peak-gbps must be a finite number of GB/s above 0, got 0.0"),
    (["bench", "kernels", "--peak-gbps", "-1"], "--peak-gbps must be a finite number of GB/s above 0, got -1.0"),
])
def test_float_options_out_of_range_are_clear_errors_before_any_work(args, message, capsys):
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


HUGE = "1000000000"


@pytest.mark.parametrize("args,message", [
    (["eval", "--model", NO_MODEL, "--threads", HUGE], f"--threads {HUGE} is more than 1024"),
    (["eval", "--model", NO_MODEL, "--repeats", HUGE], f"--repeats {HUGE} is more than 1000 (timing repeats)"),
    (["bench", "kernels", "--repeats", HUGE], f"--repeats {HUGE} is more than 1000"),
    (["bench", "generate", "--model", NO_MODEL, "--repeats", HUGE], f"--repeats {HUGE} is more than 1000"),
    (["calibrate", "--model", NO_MODEL, "--out", "s", "--channel-bins", HUGE], f"--channel-bins {HUGE} is more than 4096"),
    (["explain", "--model", NO_MODEL, "--top", HUGE], f"--top {HUGE} is more than 1000"),
    (["generate", "--model", NO_MODEL, "--prompt", "hi", "--max-cache-len", HUGE],
     f"--max-cache-len {HUGE} is more than 131072 (KV cache positions)"),
    (["bench", "generate", "--model", NO_MODEL, "--prefill", HUGE], f"--prefill {HUGE} is more than 131072"),
    (["bench", "generate", "--model", NO_MODEL, "--depth", HUGE], f"--depth {HUGE} is more than 131072"),
    (["bench", "generate", "--model", NO_MODEL, "--decode", HUGE], f"--decode {HUGE} is more than 131072"),
    (["eval", "--model", "stories260k", "--window", "4096", "--no-speed"], "more than stories260k's context of 512"),
    (["eval", "--model", "stories260k", "--window", "512", "--no-speed"], "plus the BOS token"),
    (["eval", "--model", "stories260k", "--tokens", "100", "--window", "128", "--no-speed"], "fewer than one window"),
    (["eval", "--model", "stories260k", "--tokens", "1000000000000", "--no-speed"], "fewer than the 1000000000000"),
    (["calibrate", "--model", "stories260k", "--out", "s", "--seq-len", "1000000000"], "fewer than"),
    (["generate", "--model", "stories260k", "--prompt", "hi", "--max-new-tokens", "1000000000"], "KV cache holds"),
])
def test_huge_numeric_values_are_clear_errors(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_text_that_is_a_folder_or_binary_is_named(tmp_path, capsys):
    assert cli.main(["eval", "--model", "stories260k", "--text", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    assert cli.main(["eval", "--model", "stories260k", "--text", str(binary)]) == 2
    err = capsys.readouterr().err
    assert str(binary) in err and "is not UTF-8 text" in err
    assert cli.main(["calibrate", "--model", "stories260k", "--out", str(tmp_path / "s"), "--text", str(binary)]) == 2
    assert "calibration text" in capsys.readouterr().err


def test_quantize_refuses_an_occupied_folder_before_any_work(tmp_path, capsys):
    out = tmp_path / "old"
    (out / "stats").mkdir(parents=True)
    assert cli.main(["quantize", "--model", "no-such-model", "--out", str(out)]) == 2  # before the model loads
    assert "is not an empty folder" in capsys.readouterr().err
    assert (out / "stats").is_dir()


def test_report_checks_its_recipes_before_calibrating(tmp_path, capsys):
    assert cli.main(["report", "--model", "stories260k", "--recipe", "w8a8-static", "--out", str(tmp_path / "r"),
                     "--calib-text", str(tmp_path / "absent.txt"), "--recipes", "w8a8-static"]) == 2
    assert "calibration-free recipes only" in capsys.readouterr().err


def test_calibrate_says_how_many_layers_gptq_rounded(tmp_path, capsys):
    assert cli.main(["calibrate", "--model", "stories260k", "--recipe", "w4a16-gptq", "--out", str(tmp_path / "g"),
                     "--samples", "2", "--seq-len", "32"]) == 0
    out = capsys.readouterr().out
    assert "30 layers' weights rounded" in out, out


def test_the_shared_data_is_found_from_any_working_directory(tmp_path, monkeypatch):
    from qcompiler.tools import models

    monkeypatch.delenv("QCOMPILER_DATA", raising=False)
    here = models.data_dir()
    monkeypatch.chdir(tmp_path)
    assert models.data_dir() == here and models.default_text().is_file()


def test_eval_checks_the_window_against_the_context_before_calibrating(capsys, monkeypatch):
    def calibrate(*args, **kwargs):
        raise AssertionError("calibrated before the window was checked")

    monkeypatch.setattr(cli, "_calibrate", calibrate)
    static = ["eval", "--model", "stories260k", "--recipe", "w8a8-static", "--no-speed"]
    assert cli.main(static + ["--window", "4096"]) == 2
    assert "--window 4096 plus the BOS token is more than stories260k's context of 512" in capsys.readouterr().err
    assert cli.main(static + ["--tokens", "100", "--window", "128"]) == 2
    assert "--tokens 100 is fewer than one window of 128" in capsys.readouterr().err


def test_the_default_window_is_what_the_context_leaves_beside_bos(capsys):
    from qcompiler.tools import models

    loaded = models.load_model("stories260k")  # context 512, its tokenizer adds BOS
    assert loaded.add_bos and loaded.model.config.max_position_embeddings == 512
    assert cli._window(loaded, None) == 511
    assert cli.main(["eval", "--model", "stories260k", "--tokens", "1022", "--no-speed"]) == 0
    assert "2 non-overlapping windows of 511 tokens each with BOS prepended" in capsys.readouterr().out
    assert cli.main(["eval", "--model", "stories260k", "--window", "511", "--tokens", "511", "--no-speed"]) == 0
    assert "1 non-overlapping windows of 511 tokens each with BOS prepended" in capsys.readouterr().out
