"""The table scripts the README's results come from run end to end (on stories260K, a few windows): their
JSON holds every row, the automatic recipes' compiled bits are the search's and their saved artifacts' bytes, an
infeasible budget is reported with the least the model can take."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], capture_output=True, text=True,
                          timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]


def test_autotune_table_on_stories260k(tmp_path):
    out = tmp_path / "t.json"
    _run("autotune_table.py", "--model", "stories260k", "--budgets", "8", "4", "--presets", "w4a16-rtn",
         "--uniform", "w4-g64", "--tokens", "2048", "--cache", str(tmp_path / "cache"), "--artifacts", "--json", str(out))
    doc = json.loads(out.read_text())
    results = doc["results"]
    assert set(results) == {"auto-8bpw", "w4a16-rtn", "uniform-w4-g64"}
    auto = results["auto-8bpw"]
    assert auto["bpw"] <= 8 and auto["bits"] == auto["search_bits"] and auto["kind"] == "auto"
    # the saved artifact holds exactly the bits counted (no transform adds tensors to these recipes)
    assert all(r["artifact_bytes"] * 8 == r["bits"] and r["artifact_bpw"] == r["bpw"] for r in results.values())
    assert all(r["perplexity"] > 1 and 0 <= r["top1_agreement"] <= 1 for r in results.values())
    assert "below the least this model can take" in doc["infeasible"]["auto-4bpw"]
    assert doc["float"]["perplexity"] > 1


def test_weight_only_table_on_stories260k(tmp_path):
    out = tmp_path / "w.json"
    _run("weight_only_table.py", "--model", "stories260k", "--bits", "4", "--methods", "rtn", "gptq", "--group", "32",
         "--tokens", "2048", "--samples", "2", "--seq-len", "64", "--no-torchao", "--json", str(out))
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"w4a16-rtn", "w4a16-gptq"}
    assert all(r["perplexity"] > 1 and r["kl"] >= 0 for r in results.values())
    # GPTQ's integer zero points are stored at 4 bits, RTN's float ones at 32
    assert results["w4a16-gptq"]["bpw"] < results["w4a16-rtn"]["bpw"]


def test_gemv_revision_bench_builds_a_revision_beside_this_checkout():
    # a smoke test of the A/B script the README's kernel timings come from: HEAD's kernels built under a namespace
    # of their own beside this checkout's (on a clean checkout the same source), each given the same inputs, the
    # outputs compared bit for bit, both timed
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "bench_gemv_revisions.py"), "--before", "HEAD",
                           "--op", "lm-head", "--repeats", "1"], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "four copies of SmolLM2's int8 LM head" in done.stdout
    assert "outputs equal bit for bit in 4 of 4" in done.stdout
    assert "HEAD" in done.stdout and "this checkout" in done.stdout
