"""`qcompiler generate` and `qcompiler bench generate` on stories260K; their bad inputs."""

import json
from pathlib import Path

import pytest

from qcompiler.tools import cli

PROMPT = ["--model", "stories260k", "--prompt", "Once upon a time"]


def test_generate_streams_text_and_times_prefill_and_decode_beside_float(tmp_path, capsys):
    out = tmp_path / "gen.json"
    assert cli.main(["generate", *PROMPT, "--max-new-tokens", "12", "--compare-float", "--json", str(out)]) == 0
    captured = capsys.readouterr()
    rows = json.loads(out.read_text())
    assert set(rows) == {"w8a8-dynamic", "float (eager)"}
    for row in rows.values():
        assert row["prompt_tokens"] == 5 and 1 <= row["new_tokens"] <= 12  # BOS + 4 tokens
        assert row["prefill_tokens_per_s"] > 0 and row["text"]
    assert rows["w8a8-dynamic"]["new_tokens"] < 2 or rows["w8a8-dynamic"]["decode_tokens_per_s"] > 0
    assert rows["w8a8-dynamic"]["text"] in captured.out  # streamed as it came
    assert "decode tok/s" in captured.err and "float (eager)" in captured.err


def test_generate_reads_a_prompt_file_and_samples(tmp_path):
    prompt = tmp_path / "p.txt"
    prompt.write_text("The little dog", encoding="utf-8")
    out = tmp_path / "gen.json"
    assert cli.main(["generate", "--model", "stories260k", "--prompt-file", str(prompt), "--max-new-tokens", "4",
                     "--temperature", "0.7", "--lm-head", "recipe", "--json", str(out)]) == 0
    row = json.loads(out.read_text())["w8a8-dynamic"]
    assert row["prompt_tokens"] >= 3 and 1 <= row["new_tokens"] <= 4


@pytest.mark.parametrize("args,message", [
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["--max-new-tokens", "-3"], "--max-new-tokens must be at least 1"),
    (["--temperature", "-1"], "--temperature must be 0"),
    (["--max-cache-len", "4"], "the KV cache holds 4"),
    (["--recipe", "w3a3-magic"], "unknown recipe"),
])
def test_bad_generate_arguments_are_clear_errors(args, message, capsys):
    assert cli.main(["generate", *PROMPT, *args]) == 2
    assert message in capsys.readouterr().err


def test_bad_prompts_are_clear_errors(tmp_path, capsys):
    assert cli.main(["generate", "--model", "stories260k", "--prompt", "  "]) == 2
    assert "the prompt is empty" in capsys.readouterr().err
    assert cli.main(["generate", "--model", "stories260k", "--prompt-file", str(tmp_path / "none.txt")]) == 2
    err = capsys.readouterr().err
    assert "prompt file" in err and "not found" in err
    binary = tmp_path / "b.bin"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 10)
    assert cli.main(["generate", "--model", "stories260k", "--prompt-file", str(binary)]) == 2
    assert "is not UTF-8 text" in capsys.readouterr().err
    assert cli.main(["generate", "--model", "stories260k", "--prompt", "hi", "--chat"]) == 2
    assert "no chat template" in capsys.readouterr().err


def test_an_encoder_can_not_generate(capsys):
    assert cli.main(["generate", "--model", "minilm-l6", "--prompt", "hello world"]) == 2
    assert "no generation head" in capsys.readouterr().err


def test_bench_generate_times_float_inductor_and_recipes_and_says_llama_cpp_is_missing(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "generate", "--model", "stories260k", "--recipes", "w8a8-dynamic", "--prefill", "32",
                     "--depth", "8", "--decode", "4", "--repeats", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["rows"]) == {"float (eager)", "float (Inductor)", "w8a8-dynamic"}
    for row in result["rows"].values():
        assert row["prefill_tokens_per_s"] > 0 and row["decode_tokens_per_s"] > 0
        assert row["bytes_per_token"] > 0 and 0 < row["of_bandwidth_limit"] == pytest.approx(
            row["decode_tokens_per_s"] * row["bytes_per_token"] / (result["read_bandwidth_gbps"] * 1e9))
    # int8 weights: the quantized decode step reads fewer bytes than the float one
    assert result["rows"]["w8a8-dynamic"]["bytes_per_token"] < result["rows"]["float (eager)"]["bytes_per_token"]
    assert result["prefill"] == 32 and result["depth"] == 8 and result["decode"] == 4 and result["machine"]
    assert "llama.cpp" in result["missing"]
    assert "missing: llama.cpp" in capsys.readouterr().out


def test_bench_generate_checks_its_arguments_before_timing(tmp_path, capsys):
    assert cli.main(["bench", "generate", "--model", "stories260k", "--llama-cpp", str(tmp_path)]) == 2
    assert "has no llama-bench" in capsys.readouterr().err
    assert cli.main(["bench", "generate", "--model", "stories260k", "--recipes", "nope"]) == 2
    assert "unknown recipe" in capsys.readouterr().err
    assert cli.main(["bench", "generate", "--model", "stories260k", "--decode", "0"]) == 2
    assert "--decode must be at least 1" in capsys.readouterr().err


def _stub_llama_cpp(folder: Path) -> Path:
    """A bin folder whose llama-quantize copies the file and whose llama-bench prints llama-bench's JSON
    (prefill 500 tokens/s, decode 50) and logs its arguments: what bench generate reads of llama.cpp."""
    folder.mkdir()
    (folder / "llama-quantize").write_text('#!/bin/sh\ncp "$2" "$3"\n')
    (folder / "llama-bench").write_text(
        '#!/bin/sh\necho "$@" >> "$(dirname "$0")/calls.log"\n'
        'case "$*" in *"-n 0"*) echo \'[{"avg_ts": 500.0}]\' ;; *) echo \'[{"avg_ts": 50.0}]\' ;; esac\n')
    for tool in ("llama-quantize", "llama-bench"):
        (folder / tool).chmod(0o755)
    return folder


def test_bench_generate_runs_llama_bench_in_turn_with_our_candidates(tmp_path):
    from qcompiler.tools import bench_generate, models

    bin_dir = _stub_llama_cpp(tmp_path / "bin")
    source = tmp_path / "model.gguf"
    source.write_bytes(b"GGUF" + bytes(1000))
    steps: list[str] = []
    result = bench_generate.bench_generate(models.load_model("stories260k"), {}, lambda name: None, prefill=16,
                                           depth=8, decode=3, repeats=2, llama_cpp=str(bin_dir), gguf_source=source,
                                           work_dir=tmp_path / "gguf", progress=steps.append)
    rows = result["rows"]
    assert set(rows) == {"float (eager)", "float (Inductor)", "llama.cpp Q8_0", "llama.cpp Q4_0"}
    assert rows["llama.cpp Q8_0"]["prefill_tokens_per_s"] == 500.0 and rows["llama.cpp Q4_0"]["decode_tokens_per_s"] == 50.0
    assert rows["llama.cpp Q8_0"]["bytes_per_token"] > 1000 and result["missing"] is None
    calls = (bin_dir / "calls.log").read_text().splitlines()
    assert len(calls) == 2 * 2 * 2 and all("-r 1" in c for c in calls)  # repeats x types x (prefill, decode)
    # every round: ours, then llama.cpp's, then the next round (llama.cpp's first run warms up itself)
    assert steps.index("llama.cpp Q8_0: round 1/2") < steps.index("float (eager): round 2/2") \
        < steps.index("llama.cpp Q8_0: round 2/2")
    assert "llama.cpp Q8_0: round 0/2" not in steps
