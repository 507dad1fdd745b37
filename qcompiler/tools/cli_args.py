"""The ``qcompiler`` command line's arguments (``cli.py`` runs the commands), and the checks of its
numeric options that run before any work starts."""

from __future__ import annotations

import argparse

from qcompiler.config import PRESETS
from qcompiler.core.errors import ConfigError

MODEL_HELP = "alias (smollm2-135m, stories260k, minilm-l6), HF folder or .gguf file"
RECIPE_HELP = (f"preset ({', '.join(sorted(PRESETS))}), a recipe JSON file, or a folder holding recipe.json "
               "(what `qcompiler autotune --out` writes)")


def _add_calibration_args(p: argparse.ArgumentParser, text_flag: str) -> None:
    p.add_argument(text_flag, dest="calib_text", default=None,
                   help="calibration text (default: <data>/wikitext-2/valid.txt)")
    p.add_argument("--samples", type=int, default=128, help="calibration samples (default 128)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sample (default 512)")


def add_other_weights(p: argparse.ArgumentParser) -> None:
    p.add_argument("--other-weights", action="store_true",
                   help="use --stats gathered on other float weights than the model's (another checkpoint or "
                        "fine-tune with the same names and shapes) on purpose; by default that is an error")


def _add_eval_args(p: argparse.ArgumentParser, demo: bool) -> None:
    if not demo:
        p.add_argument("--model", required=True, help=MODEL_HELP)
        p.add_argument("--recipe", default="w8a8-dynamic", help=RECIPE_HELP)
        p.add_argument("--text", default=None, help="evaluation text (default: <data>/wikitext-2-raw/wiki.test.raw)")
        p.add_argument("--kernels", default="fast", choices=["fast", "reference"])
        p.add_argument("--compiler", default="inductor", choices=["inductor", "eager"],
                       help="what runs the quantized graph: inductor (default) or eager (op by op, no Inductor "
                            "compile: quicker to start for accuracy runs; its timings are not qcompiler's speed)")
        p.add_argument("--stats", default=None,
                       help="calibration folder for static recipes (default: calibrate now on --calib-text)")
        add_other_weights(p)
        _add_calibration_args(p, "--calib-text")
    p.add_argument("--tokens", type=int, default=20480, help="tokens of the text to score (default 20480)")
    p.add_argument("--window", type=int, default=None,
                   help="window length in tokens, BOS not counted (default 512, or what the model's context leaves)")
    p.add_argument("--no-speed", action="store_true", help="skip the latency measurements")
    p.add_argument("--repeats", type=int, default=10, help="timing repeats (median is reported)")
    p.add_argument("--inductor-baseline", action="store_true",
                   help="also time the float model compiled by Inductor (separates int8 gains from fusion)")
    p.add_argument("--json", dest="json_out", default=None, help="write every number to this JSON file")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qcompiler", description="Post-training quantization compiler for PyTorch LMs")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_eval_args(sub.add_parser("eval", help="float vs quantized: perplexity, KL, top-1, size, latency"), demo=False)
    _add_eval_args(sub.add_parser("demo", help="eval SmolLM2-135M with w8a8-dynamic on WikiText-2, then generate"), demo=True)
    cal = sub.add_parser("calibrate", help="gather activation statistics for static recipes")
    cal.add_argument("--model", required=True, help=MODEL_HELP)
    cal.add_argument("--recipe", default="w8a8-static",
                     help="the recipe whose skip list, transforms and rounding decide what is gathered: " + RECIPE_HELP)
    _add_calibration_args(cal, "--text")
    cal.add_argument("--out", required=True, help="folder to write the statistics to")
    cal.add_argument("--channel-bins", type=int, default=0,
                     help="also keep a histogram per input channel with this many bins (e.g. 1024) for per-channel "
                          "percentile/MSE/KL ranges (default 0: per-channel min/max and moving averages only)")
    quant = sub.add_parser("quantize", help="quantize a model and save the artifact (weights + manifest)")
    quant.add_argument("--model", required=True, help=MODEL_HELP)
    quant.add_argument("--recipe", default="w8a8-dynamic", help=RECIPE_HELP)
    quant.add_argument("--out", required=True, help="artifact folder to write")
    quant.add_argument("--stats", default=None, help="calibration folder (default: calibrate now if the recipe needs it)")
    add_other_weights(quant)
    _add_calibration_args(quant, "--calib-text")
    quant.add_argument("--text", default=None, help="text whose first --tokens tokens are the example batch")
    quant.add_argument("--tokens", type=int, default=256, help="tokens in the example batch (default 256)")
    rep = sub.add_parser("report", help="an HTML page with plots: outliers, per-layer SQNR, perplexity vs bits")
    rep.add_argument("--model", required=True, help=MODEL_HELP)
    rep.add_argument("--recipe", default="w8a8-smoothquant", help=RECIPE_HELP)
    rep.add_argument("--out", required=True, help="folder for index.html and the PNGs")
    rep.add_argument("--stats", default=None, help="calibration folder (default: calibrate now if the recipe needs it)")
    add_other_weights(rep)
    _add_calibration_args(rep, "--calib-text")
    rep.add_argument("--text", default=None, help="text whose first --tokens tokens are the example batch")
    rep.add_argument("--tokens", type=int, default=2048,
                     help="tokens of the evaluation text for the perplexity plot (default 2048)")
    rep.add_argument("--recipes", nargs="*", default=["w8a8-dynamic", "w4a16-rtn", "w4a16-hqq"],
                     help="calibration-free recipes to place on the perplexity/bits plot beside --recipe (presets, "
                          "recipe JSON files, folders holding recipe.json)")
    explain = sub.add_parser("explain", help="the plan per layer (scheme, bpw, transforms, kernel) and the error table")
    explain.add_argument("--model", required=True, help=MODEL_HELP)
    explain.add_argument("--recipe", default="w8a8-dynamic", help=RECIPE_HELP)
    explain.add_argument("--stats", default=None, help="calibration folder (default: calibrate now if the recipe needs it)")
    add_other_weights(explain)
    _add_calibration_args(explain, "--calib-text")
    explain.add_argument("--text", default=None, help="text whose first --tokens tokens are the example batch")
    explain.add_argument("--tokens", type=int, default=256, help="tokens in the example batch (default 256)")
    explain.add_argument("--top", type=int, default=5, help="worst layers to attribute by keeping each in float")
    explain.add_argument("--no-errors", action="store_true", help="print the plan only, skip the error table")
    from qcompiler.tools.export import command as export_command

    export = sub.add_parser("export", help="write a compressed-tensors folder (vLLM, transformers) or a GGUF file "
                            "(llama.cpp)")
    export_command.add_arguments(export, MODEL_HELP, RECIPE_HELP)
    add_other_weights(export)
    from qcompiler.tools.autotune import command as autotune_command

    autotune_command.add_arguments(sub.add_parser("autotune", help="the mixed-precision recipe of least error under a "
                                                  "bits-per-weight target (one candidate scheme per layer)"), MODEL_HELP)
    _add_generate_parser(sub.add_parser("generate", help="stream text from the quantized model; prefill and decode tokens/s"))
    _add_bench_parser(sub.add_parser("bench", help="time qcompiler's kernels, or generation, against their float baselines"))
    return parser

def _add_generate_parser(gen: argparse.ArgumentParser) -> None:
    gen.add_argument("--model", required=True, help=MODEL_HELP)
    gen.add_argument("--recipe", default="w8a8-dynamic", help=RECIPE_HELP)
    source = gen.add_mutually_exclusive_group()
    source.add_argument("--stats", default=None, help="calibration folder (default: calibrate now if the recipe needs it)")
    source.add_argument("--artifact", default=None, help="a folder written by `qcompiler quantize` (brings its recipe)")
    _add_calibration_args(gen, "--calib-text")
    prompt = gen.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", default=None, help="the prompt text")
    prompt.add_argument("--prompt-file", default=None, help="a UTF-8 text file holding the prompt")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    gen.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    gen.add_argument("--compare-float", action="store_true", help="also generate with the float model and compare")
    gen.add_argument("--max-cache-len", type=int, default=None, help="KV cache positions (default: min(context, 1024))")
    gen.add_argument("--json", dest="json_out", default=None, help="write the text and timings to this JSON file")
    gen.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    gen.add_argument("--lm-head", choices=["int8", "recipe"], default="int8",
                     help="int8 (default): int8 weights per channel for an LM head the recipe keeps float; recipe: as is")


def _add_bench_parser(bench: argparse.ArgumentParser) -> None:
    bench.add_argument("what", choices=["kernels", "generate"],
                       help="kernels: each GEMM against float; generate: prefill/decode tokens/s of whole models")
    bench.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    bench.add_argument("--shapes", default=None,
                       help="comma-separated MxNxK list (default: SmolLM2's layers and 4096x4096 at M=1,16,512; "
                            "on CUDA also 4096x4096x4096)")
    bench.add_argument("--repeats", type=int, default=None,
                       help="interleaved timing repeats, median reported (default: kernels 30, generate 5)")
    bench.add_argument("--model", default="smollm2-135m", help=f"generate: {MODEL_HELP} (default smollm2-135m)")
    bench.add_argument("--recipes", nargs="+", default=["w8a8-dynamic", "w4a16-rtn"], help="generate: recipes to time (presets, recipe JSON files, folders holding recipe.json)")
    bench.add_argument("--llama-cpp", default=None, metavar="BIN_DIR",
                       help="generate: llama.cpp's bin folder (python -m qcompiler.tools.llama_cpp builds it and prints it) to add "
                            "llama-bench rows for Q8_0/Q4_0 GGUFs made from the model's GGUF with llama-quantize")
    bench.add_argument("--prefill", type=int, default=512, help="generate: prompt tokens of the prefill test (512)")
    bench.add_argument("--depth", type=int, default=128, help="generate: context before the decode test (128)")
    bench.add_argument("--decode", type=int, default=64, help="generate: tokens of the decode test (64)")
    bench.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    bench.add_argument("--json", dest="json_out", default=None, help="write every number to this JSON file")
    bench.add_argument("--peak-gbps", type=float, default=None,
                       help="peak memory bandwidth in GB/s for the w4a16 rows' %%peak column (default: looked up "
                            "from the CUDA device's name; none on CPU)")


# (option, smallest value, largest value or None, what it is): every numeric option is checked before any work.
# The largest values keep a typo from hanging or allocating absurdly: timing repeats, histograms per channel
# (float64 while calibrating), layers re-run one by one, KV cache positions.
_MOST_POSITIONS = 1 << 17  # the longest contexts of today's models
_LIMITS = (("tokens", 1, None, "tokens to read"), ("window", 2, None, "tokens per window"),
           ("repeats", 1, 1000, "timing repeats"), ("samples", 1, None, "calibration samples"),
           ("seq_len", 2, None, "tokens per calibration sample"), ("top", 0, 1000, "layers to attribute"),
           ("channel_bins", 0, 4096, "bins per channel (0: none)"), ("max_new_tokens", 1, None, "tokens to generate"),
           ("threads", 1, 1024, "threads"), ("prefill", 1, _MOST_POSITIONS, "prefill tokens"),
           ("depth", 1, _MOST_POSITIONS, "context tokens"), ("decode", 1, _MOST_POSITIONS, "decode tokens"),
           ("max_cache_len", 2, _MOST_POSITIONS, "KV cache positions"))


def check_numbers(args) -> None:
    """A :class:`ConfigError` for the first numeric option outside its sensible range."""
    for name, lowest, highest, what in _LIMITS:
        value = getattr(args, name, None)
        flag = "--" + name.replace("_", "-")
        if value is not None and value < lowest:
            raise ConfigError(f"{flag} must be at least {lowest} ({what}), got {value}")
        if value is not None and highest is not None and value > highest:
            raise ConfigError(f"{flag} {value} is more than {highest} ({what}): give {highest} or less")
    temperature = getattr(args, "temperature", None)
    if temperature is not None and not 0 <= temperature < float("inf"):
        raise ConfigError(f"--temperature must be 0 (greedy) or a finite number above it, got {temperature}")
    peak = getattr(args, "peak_gbps", None)
    if peak is not None and not 0 < peak < float("inf"):
        raise ConfigError(f"--peak-gbps must be a finite number of GB/s above 0, got {peak}")
