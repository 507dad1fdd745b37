"""Output paths are checked before any work, and outputs are written whole or not at all (issue 14, item 8
and the fault test): a run killed while saving leaves the old folder intact, or no folder."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from qcompiler.calibration.stats import CalibrationStats
from qcompiler.core.errors import OutputPathError
from qcompiler.core.files import atomic_folder, check_output, write_text_atomic
from qcompiler.tools import cli, models

CALIB = ["--model", "stories260k", "--recipe", "w8a8-static", "--samples", "2", "--seq-len", "16"]


def test_bad_output_paths_are_refused_before_the_model_loads(tmp_path, capsys):
    afile = tmp_path / "notes.txt"
    afile.write_text("keep me")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("keep me too")
    cases = [
        (["calibrate", "--model", "no-such-model", "--out", str(afile)], "is a file"),
        (["calibrate", "--model", "no-such-model", "--out", str(busy)], "is not an empty folder"),
        (["calibrate", "--model", "no-such-model", "--out", str(afile / "sub")], "is a file, not a folder"),
        (["quantize", "--model", "no-such-model", "--out", str(afile)], "is a file"),
        (["eval", "--model", "no-such-model", "--json", str(busy)], "--json"),
        (["bench", "kernels", "--json", str(busy)], "is a folder"),
        (["generate", "--model", "no-such-model", "--prompt", "hi", "--json", str(busy)], "is a folder"),
        (["report", "--model", "no-such-model", "--out", str(afile)], "is a file"),
        (["export", "--model", "no-such-model", "--format", "compressed-tensors", "--out", str(busy)],
         "is not an empty folder"),
    ]
    for argv, words in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert words in err and "neither an alias" not in err, (argv, err)  # refused before loading the model
    assert afile.read_text() == "keep me" and (busy / "mine.txt").read_text() == "keep me too"


def test_a_calibration_folder_is_replaced_whole_and_json_results_overwrite(tmp_path, capsys):
    out = tmp_path / "stats"
    assert cli.main(["calibrate", *CALIB, "--out", str(out)]) == 0
    first = CalibrationStats.load(out).info["tokens"]
    assert cli.main(["calibrate", *CALIB[:-4], "--samples", "3", "--seq-len", "16", "--out", str(out)]) == 0
    assert CalibrationStats.load(out).info["tokens"] == first * 3 // 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats"]  # no temporary or old folder left beside
    capsys.readouterr()


def test_atomic_helpers_leave_nothing_half_written(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(target) as tmp:
            (tmp / "a").write_text("half")
            raise KeyboardInterrupt
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_folder(target) as tmp:
        (tmp / "a").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_folder(target) as tmp:
            (tmp / "a").write_text("new")
            raise RuntimeError("disk full")
    assert (target / "a").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out"]
    write_text_atomic(tmp_path / "r.json", "{}")
    assert (tmp_path / "r.json").read_text() == "{}"
    with pytest.raises(OutputPathError, match="is a folder"):
        check_output(target, "--json", folder=False)
    with pytest.raises(OutputPathError, match="is a file"):
        check_output(tmp_path / "r.json", "--out", folder=True)


# The child process runs the CLI and is killed (SIGKILL, no clean-up of any kind) right after the first
# safetensors file of the save is complete: the moment a non-atomic writer leaves a half-written folder.
_KILLED = textwrap.dedent("""
    import os, signal, sys
    import safetensors.torch as st
    real = st.save_file
    def save_then_die(*args, **kwargs):
        real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
    st.save_file = save_then_die
    from qcompiler.tools import cli
    sys.exit(cli.main(sys.argv[1:]))
""")


def _killed_run(argv):
    env = {**os.environ, "QCOMPILER_DATA": str(models.data_dir())}
    proc = subprocess.run([sys.executable, "-c", _KILLED, *argv], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]


def test_a_run_killed_while_saving_leaves_the_old_folder_or_none(tmp_path):
    new = tmp_path / "new-stats"
    _killed_run(["calibrate", *CALIB, "--out", str(new)])
    assert not new.exists()
    old = tmp_path / "old-stats"
    assert cli.main(["calibrate", *CALIB, "--out", str(old)]) == 0
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    _killed_run(["calibrate", *CALIB[:-4], "--samples", "3", "--seq-len", "16", "--out", str(old)])
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before
    assert CalibrationStats.load(old).info["tokens"] == 32
    art = tmp_path / "artifact"
    _killed_run(["quantize", "--model", "stories260k", "--recipe", "w8a8-dynamic", "--tokens", "16", "--out", str(art)])
    assert not art.exists()
    # what a killed run leaves is a hidden temporary sibling, never a folder under the name asked for
    assert all(p.name.startswith(".") for p in tmp_path.iterdir() if p.name != "old-stats")


def test_a_json_result_is_complete_or_absent(tmp_path):
    path = tmp_path / "result.json"
    path.write_text(json.dumps({"old": 1}))
    with pytest.raises(TypeError):
        write_text_atomic(path, object())  # fails before anything is written
    assert json.loads(path.read_text()) == {"old": 1}
