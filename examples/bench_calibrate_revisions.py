"""``qcompiler calibrate`` of this checkout against the one of an earlier git revision, taking turns.

Checks ``--before`` out into a temporary git worktree and runs ``qcompiler calibrate`` (SmolLM2-135M, ``--recipe``,
``--samples`` x ``--seq-len`` tokens of the default calibration text) from each tree in turn, ``--rounds`` times,
each in a fresh process; prints each run's own timing (``info["seconds"]``: the calibration, the first batch's
capture included, without loading the model), the medians and their ratio, and whether both trees wrote the same
statistics bit for bit.

    python examples/bench_calibrate_revisions.py --before 472b377
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from qcompiler.tools import models
from qcompiler.tools.timing import machine_name

ROOT = Path(__file__).resolve().parent.parent

# Runs the CLI with ``qcompiler`` (and its ``passes`` and ``lowering`` folders) imported from the tree argv[1],
# ahead of the editable install's mapping to this checkout.
LAUNCHER = """
import importlib.abc, importlib.util, runpy, sys
root = sys.argv.pop(1)
folders = {"qcompiler": "qcompiler", "qcompiler.passes": "passes", "qcompiler.lowering": "lowering"}
class Tree(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name in folders:
            folder = f"{root}/{folders[name]}"
            return importlib.util.spec_from_file_location(name, f"{folder}/__init__.py",
                                                          submodule_search_locations=[folder])
sys.meta_path.insert(0, Tree())
sys.argv[0] = "qcompiler"
runpy.run_module("qcompiler.tools.cli", run_name="__main__")
"""


def _calibrate(tree: Path, out: Path, args) -> float:
    cmd = [sys.executable, "-c", LAUNCHER, str(tree), "calibrate", "--model", "smollm2-135m", "--recipe", args.recipe,
           "--text", str(models.default_calibration_text()), "--samples", str(args.samples), "--seq-len",
           str(args.seq_len), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"calibrate failed in {tree}:\n{proc.stderr[-3000:]}")
    return float(json.loads((out / "calibration.json").read_text())["info"]["seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="the git revision to compare against")
    parser.add_argument("--recipe", default="w8a8-static")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(old), args.before], cwd=ROOT, check=True)
        try:
            times = {"before": [], "now": []}
            for r in range(args.rounds):
                for label, tree in (("before", old), ("now", ROOT)):
                    times[label].append(_calibrate(tree, Path(tmp) / f"{label}-{r}", args))
                    print(f"round {r + 1}: {label} {times[label][-1]:.2f} s", flush=True)
            a, b = (load_file(str(Path(tmp) / f"{label}-0" / "calibration.safetensors")) for label in ("before", "now"))
            same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=ROOT, check=True)
    before, now = statistics.median(times["before"]), statistics.median(times["now"])
    print(f"{machine_name()}: calibrate {args.recipe}, {args.samples} x {args.seq_len} tokens, medians of "
          f"{args.rounds}: {args.before} {before:.2f} s, this checkout {now:.2f} s ({now / before:.2f}x); "
          f"statistics {'the same bit for bit' if same else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
