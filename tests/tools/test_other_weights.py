"""Statistics gathered on other weights are refused wherever they are applied, through the Python API and
the command line (a StatsError raised inside the backend included), unless --other-weights says so."""

import pytest
import torch

import qcompiler
from qcompiler.calibration.calibrate import text_batches
from qcompiler.calibration.stats import TENSORS_FILE
from qcompiler.core.errors import StatsError
from qcompiler.tools import cli, models, quantize
from qcompiler.tools.export import build

OTHER = "gathered on other weights"


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    qcompiler.clear_reports()


@pytest.fixture(scope="module")
def stories():
    return models.load_model("stories260k")


@pytest.fixture(scope="module")
def twin_stats(stories, tmp_path_factory):
    """w8a8-static statistics of a random-weight model with stories260k's config, saved to a folder."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    twin = AutoModelForCausalLM.from_config(stories.model.config).eval()
    batches = text_batches(stories.tokenizer, models.default_calibration_text(), 2, 32, add_bos=True)
    stats = qcompiler.calibrate(twin, batches, "w8a8-static", progress=False)
    return stats, stats.save(tmp_path_factory.mktemp("twin") / "stats")


def _ids(stories):
    return stories.tokenizer("Once upon a time there was a cat", return_tensors="pt")["input_ids"]


def test_quantize_export_and_compare_refuse_statistics_of_other_weights(stories, twin_stats, tmp_path):
    stats, _ = twin_stats
    ids = _ids(stories)
    with pytest.raises(StatsError, match=OTHER):
        quantize.quantize(stories.model, "w8a8-static", ids, tmp_path / "art", stats)
    assert not (tmp_path / "art").exists()
    with pytest.raises(StatsError, match=OTHER):
        build.export_model(stories, "w8a8-static", ids, stats)
    with pytest.raises(StatsError, match=OTHER):
        qcompiler.compare(stories.model, "w8a8-static", ids, stats=stats, top=0)
    # on purpose: the override is respected by each of them
    assert quantize.quantize(stories.model, "w8a8-static", ids, tmp_path / "art", stats, errors=False,
                             other_weights=True).is_dir()
    assert build.export_model(stories, "w8a8-static", ids, stats, other_weights=True).linears
    assert qcompiler.compare(stories.model, "w8a8-static", ids, stats=stats, top=0, other_weights=True).layers


EVAL = ["eval", "--model", "stories260k", "--recipe", "w8a8-static", "--tokens", "128", "--window", "64", "--no-speed"]


def test_the_cli_reports_statistics_of_other_weights_raised_inside_the_backend(twin_stats, capsys):
    _, folder = twin_stats
    assert cli.main(EVAL + ["--stats", str(folder)]) == 2  # Dynamo wraps the backend's StatsError
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("qcompiler: these statistics were gathered on other weights") and "--other-weights" in last
    assert "Traceback" not in err and "BackendCompilerFailed" not in err
    assert cli.main(["explain", "--model", "stories260k", "--recipe", "w8a8-static", "--stats", str(folder),
                     "--tokens", "32", "--no-errors"]) == 2
    assert OTHER in capsys.readouterr().err
    assert cli.main(EVAL + ["--stats", str(folder), "--other-weights"]) == 0
    assert "recipe w8a8-static" in capsys.readouterr().out


def test_the_cli_refuses_a_flipped_byte_and_other_weights_outside_the_backend(twin_stats, tmp_path, capsys):
    import shutil

    _, folder = twin_stats
    flipped = shutil.copytree(folder, tmp_path / "flipped")
    blob = bytearray((flipped / TENSORS_FILE).read_bytes())
    blob[-2] ^= 0x40
    (flipped / TENSORS_FILE).write_bytes(bytes(blob))
    assert cli.main(EVAL + ["--stats", str(flipped)]) == 2
    assert "does not match the checksum" in capsys.readouterr().err
    quant = ["quantize", "--model", "stories260k", "--recipe", "w8a8-static", "--stats", str(folder), "--tokens", "32"]
    assert cli.main(quant + ["--out", str(tmp_path / "a")]) == 2
    assert OTHER in capsys.readouterr().err and not (tmp_path / "a").exists()
    assert cli.main(quant + ["--out", str(tmp_path / "a"), "--other-weights"]) == 0
    export = ["export", "--model", "stories260k", "--recipe", "w8a8-static", "--format", "compressed-tensors",
              "--stats", str(folder), "--tokens", "32", "--out", str(tmp_path / "e")]
    assert cli.main(export) == 2
    assert OTHER in capsys.readouterr().err


def test_other_weights_is_documented_in_help(capsys):
    for command in ("eval", "explain", "quantize", "report", "export"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        assert "--other-weights" in capsys.readouterr().out, command
