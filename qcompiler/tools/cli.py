"""The ``qcompiler`` command line.

    qcompiler eval --model smollm2-135m --recipe w8a8-dynamic --text ../shared/data/wikitext-2-raw/wiki.test.raw
    qcompiler demo
    qcompiler calibrate --model smollm2-135m --recipe w8a8-static --samples 128 --seq-len 512 --out stats/
    qcompiler eval --model smollm2-135m --recipe w8a8-static --stats stats/
    qcompiler explain --model smollm2-135m --recipe w8a8-smoothquant
    qcompiler quantize --model smollm2-135m --recipe w8a8-ocs-llm-int8 --out smol-int8/
    qcompiler generate --model smollm2-135m --recipe w8a8-dynamic --prompt "The capital of France is" --compare-float
    qcompiler export --model smollm2-135m --recipe w8a8-dynamic --format compressed-tensors --out smol-w8a8/
    qcompiler bench kernels
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qcompiler.config import PRESETS, BackendOptions
from qcompiler.core.errors import ConfigError, InputFileError, QCompilerError

MODEL_HELP = "alias (smollm2-135m, stories260k, minilm-l6), HF folder or .gguf file"


def _add_calibration_args(p: argparse.ArgumentParser, text_flag: str) -> None:
    p.add_argument(text_flag, dest="calib_text", default=None,
                   help="calibration text (default: <data>/wikitext-2/valid.txt)")
    p.add_argument("--samples", type=int, default=128, help="calibration samples (default 128)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sample (default 512)")


def _add_eval_args(p: argparse.ArgumentParser, demo: bool) -> None:
    if not demo:
        p.add_argument("--model", required=True, help=MODEL_HELP)
        p.add_argument("--recipe", default="w8a8-dynamic", help=f"preset: {', '.join(sorted(PRESETS))}")
        p.add_argument("--text", default=None, help="evaluation text (default: <data>/wikitext-2-raw/wiki.test.raw)")
        p.add_argument("--kernels", default="fast", choices=["fast", "reference"])
        p.add_argument("--stats", default=None,
                       help="calibration folder for static recipes (default: calibrate now on --calib-text)")
        _add_calibration_args(p, "--calib-text")
    p.add_argument("--tokens", type=int, default=20480, help="tokens of the text to score (default 20480)")
    p.add_argument("--window", type=int, default=512, help="window length in tokens (default 512)")
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
    cal.add_argument("--recipe", default="w8a8-static", help="recipe whose skip list decides the layers")
    _add_calibration_args(cal, "--text")
    cal.add_argument("--out", required=True, help="folder to write the statistics to")
    cal.add_argument("--channel-bins", type=int, default=0,
                     help="also keep a histogram per input channel with this many bins (e.g. 1024) for per-channel "
                          "percentile/MSE/KL ranges (default 0: per-channel min/max and moving averages only)")
    quant = sub.add_parser("quantize", help="quantize a model and save the artifact (weights + manifest)")
    quant.add_argument("--model", required=True, help=MODEL_HELP)
    quant.add_argument("--recipe", default="w8a8-dynamic", help=f"preset: {', '.join(sorted(PRESETS))}")
    quant.add_argument("--out", required=True, help="artifact folder to write")
    quant.add_argument("--stats", default=None, help="calibration folder (default: calibrate now if the recipe needs it)")
    _add_calibration_args(quant, "--calib-text")
    quant.add_argument("--text", default=None, help="text whose first --tokens tokens are the example batch")
    quant.add_argument("--tokens", type=int, default=256, help="tokens in the example batch (default 256)")
    rep = sub.add_parser("report", help="an HTML page with plots: outliers, per-layer SQNR, perplexity vs bits")
    rep.add_argument("--model", required=True, help=MODEL_HELP)
    rep.add_argument("--recipe", default="w8a8-smoothquant", help=f"preset: {', '.join(sorted(PRESETS))}")
    rep.add_argument("--out", required=True, help="folder for index.html and the PNGs")
    rep.add_argument("--stats", default=None, help="calibration folder (default: calibrate now if the recipe needs it)")
    _add_calibration_args(rep, "--calib-text")
    rep.add_argument("--text", default=None, help="text whose first --tokens tokens are the example batch")
    rep.add_argument("--tokens", type=int, default=2048,
                     help="tokens of the evaluation text for the perplexity plot (default 2048)")
    rep.add_argument("--recipes", nargs="*", default=["w8a8-dynamic", "w4a16-rtn", "w4a16-hqq"],
                     help="calibration-free recipes to place on the perplexity/bits plot beside --recipe")
    explain = sub.add_parser("explain", help="the plan per layer (scheme, bpw, transforms, kernel) and the error table")
    explain.add_argument("--model", required=True, help=MODEL_HELP)
    explain.add_argument("--recipe", default="w8a8-dynamic", help=f"preset: {', '.join(sorted(PRESETS))}")
    explain.add_argument("--stats", default=None, help="calibration folder (default: calibrate now if the recipe needs it)")
    _add_calibration_args(explain, "--calib-text")
    explain.add_argument("--text", default=None, help="text whose first --tokens tokens are the example batch")
    explain.add_argument("--tokens", type=int, default=256, help="tokens in the example batch (default 256)")
    explain.add_argument("--top", type=int, default=5, help="worst layers to attribute by keeping each in float")
    explain.add_argument("--no-errors", action="store_true", help="print the plan only, skip the error table")
    from qcompiler.tools.export import command as export_command

    export_command.add_arguments(sub.add_parser("export", help="write a compressed-tensors folder (vLLM, transformers) "
                                                "or a GGUF file (llama.cpp)"), MODEL_HELP, ", ".join(sorted(PRESETS)))
    _add_generate_parser(sub.add_parser("generate", help="stream text from the quantized model; prefill and decode tokens/s"))
    _add_bench_parser(sub.add_parser("bench", help="time qcompiler's kernels, or generation, against their float baselines"))
    return parser

def _add_generate_parser(gen: argparse.ArgumentParser) -> None:
    gen.add_argument("--model", required=True, help=MODEL_HELP)
    gen.add_argument("--recipe", default="w8a8-dynamic", help=f"preset: {', '.join(sorted(PRESETS))}")
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
    bench.add_argument("--recipes", nargs="+", default=["w8a8-dynamic", "w4a16-rtn"], help="generate: recipes to time")
    bench.add_argument("--llama-cpp", default=None, metavar="BIN_DIR",
                       help="generate: llama.cpp's bin folder (../shared/tools/build-llama-cpp.sh prints it) to add "
                            "llama-bench rows for Q8_0/Q4_0 GGUFs made from the model's GGUF with llama-quantize")
    bench.add_argument("--prefill", type=int, default=512, help="generate: prompt tokens of the prefill test (512)")
    bench.add_argument("--depth", type=int, default=128, help="generate: context before the decode test (128)")
    bench.add_argument("--decode", type=int, default=64, help="generate: tokens of the decode test (64)")
    bench.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    bench.add_argument("--json", dest="json_out", default=None, help="write every number to this JSON file")
    bench.add_argument("--peak-gbps", type=float, default=None,
                       help="peak memory bandwidth in GB/s for the w4a16 rows' %%peak column (default: looked up "
                            "from the CUDA device's name; none on CPU)")


def _parse_shapes(text: str) -> list[tuple[int, int, int]]:
    shapes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ConfigError(f"--shapes: {item.strip()!r} is not MxNxK with positive integers (e.g. 1x4096x4096)")
        shapes.append(tuple(int(p) for p in parts))
    return shapes


def format_plan(rep) -> str:
    """The compile report as a terminal table: one row per linear layer, then the transforms' notes."""
    rows = [("layer", "scheme", "bpw", "kernel / why float", "notes")]
    for d in rep.layers:
        if d.quantized:
            kernel, _ = rep.kernel_of.get(d.module, ("quantize/dequantize graph", ""))
            rows.append((d.module, d.scheme, f"{d.bits_per_weight:.2f}", kernel, d.reason))
        else:
            rows.append((d.module, "float", "", d.reason, ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"recipe {rep.recipe}: {len(rep.quantized)} linear layers quantized, {len(rep.kept_float)} kept in float"]
    for i, r in enumerate(rows):
        lines.append(("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4]).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    for name, notes in rep.transforms.items():
        lines.append(f"\n{name}:")
        lines.extend(f"  {note}" for note in notes)
    return "\n".join(lines)


def run_explain(args) -> int:
    import torch

    import qcompiler
    from qcompiler.config import resolve_recipe
    from qcompiler.tools import models

    recipe = resolve_recipe(args.recipe)
    loaded = models.load_model(args.model)
    stats = args.stats
    if stats is None and recipe.needs_calibration:
        stats = _calibrate(loaded, recipe, args.calib_text, args.samples, args.seq_len)
    batch = _example_batch(loaded, args.text, args.tokens)
    torch._dynamo.reset()
    qcompiler.clear_reports()
    with torch.inference_mode():
        torch.compile(loaded.model, backend="qcompiler", options={"recipe": recipe, "stats": stats})(**batch)
    print(format_plan(qcompiler.last_report()))
    if not args.no_errors:
        print()
        print(qcompiler.compare(loaded.model, recipe, batch, stats=stats, top=args.top))
    return 0


def _example_batch(loaded, text, tokens: int) -> dict:
    from qcompiler.tools import evaluate, models

    path = Path(text) if text else models.default_text()
    ids = evaluate.read_tokens(path, loaded.tokenizer, tokens).unsqueeze(0)
    return {"input_ids": ids} if loaded.kind == "encoder" else {"input_ids": ids, "use_cache": False}


def run_quantize(args) -> int:
    from qcompiler import artifact
    from qcompiler.config import resolve_recipe
    from qcompiler.tools import models, quantize

    recipe = resolve_recipe(args.recipe)
    loaded = models.load_model(args.model)
    stats = args.stats
    if stats is None and recipe.needs_calibration:
        stats = _calibrate(loaded, recipe, args.calib_text, args.samples, args.seq_len)
    folder = quantize.quantize(loaded.model, recipe, _example_batch(loaded, args.text, args.tokens), args.out, stats)
    manifest = json.loads((folder / artifact.MANIFEST).read_text())
    quantized = [layer for layer in manifest["layers"] if layer["quantized"]]
    size = (folder / artifact.WEIGHTS).stat().st_size
    print(f"wrote {folder}: {len(quantized)} quantized layers, {size / 1e6:.1f} MB of tensors, "
          f"logits KL on the example batch {manifest['logits_kl_on_example']:.4g}")
    return 0


def run_report(args) -> int:
    import torch

    import qcompiler
    from qcompiler.calibration.stats import resolve_stats
    from qcompiler.config import resolve_recipe
    from qcompiler.tools import models, report_html

    recipe = resolve_recipe(args.recipe)
    loaded = models.load_model(args.model)
    stats = resolve_stats(args.stats)
    if stats is None and recipe.needs_calibration:
        stats = _calibrate(loaded, recipe, args.calib_text, args.samples, args.seq_len)
    others = {name: (resolve_recipe(name), None) for name in args.recipes}
    bad = [name for name, (r, _) in others.items() if r.needs_calibration]
    if bad:
        raise ConfigError(f"--recipes takes calibration-free recipes only; {bad} need statistics")
    batch = _example_batch(loaded, args.text, 256)
    torch._dynamo.reset()
    qcompiler.clear_reports()
    with torch.inference_mode():
        torch.compile(loaded.model, backend="qcompiler", options={"recipe": recipe, "stats": stats})(**batch)
    plan = format_plan(qcompiler.last_report())
    path = report_html.build(loaded, recipe, stats, Path(args.out), batch, {recipe.name: (recipe, stats), **others},
                             args.tokens, plan)
    print(f"wrote {path}")
    return 0


def run_bench(args) -> int:
    import torch

    from qcompiler.tools import bench

    if args.threads:
        torch.set_num_threads(args.threads)
    progress = lambda s: print(f"timing {s} ...", file=sys.stderr)  # noqa: E731
    if args.what == "generate":
        from qcompiler.tools import bench_generate

        result = bench_generate.run_cli(args, _calibrate, progress)
        print(bench_generate.format_table(result))
    else:
        shapes = _parse_shapes(args.shapes) if args.shapes else None  # None: the device's defaults
        result = bench.bench_kernels(args.device, shapes, repeats=args.repeats or 30, peak_gbps=args.peak_gbps,
                                     progress=progress)
        print(bench.format_table(result))
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json_out}", file=sys.stderr)
    return 0


def run_generate(args) -> int:
    from qcompiler.tools import chat

    return chat.run_cli(args, _calibrate)


def _calibrate(loaded, recipe: str, text: str | None, samples: int, seq_len: int, channel_bins: int = 0):
    from qcompiler.calibration.calibrate import calibrate, text_batches
    from qcompiler.tools import models

    path = Path(text) if text else models.default_calibration_text()
    if not path.is_file():
        raise InputFileError(f"calibration text {path} not found (give it, or set QCOMPILER_DATA)")
    batches = text_batches(loaded.tokenizer, path, samples, seq_len, add_bos=loaded.add_bos)
    print(f"calibrating on {samples} x {seq_len} tokens of {path} ...", file=sys.stderr)
    return calibrate(loaded.model, batches, recipe, channel_bins=channel_bins)


def run_calibrate(args) -> int:
    from qcompiler.tools import models

    loaded = models.load_model(args.model)
    stats = _calibrate(loaded, args.recipe, args.calib_text, args.samples, args.seq_len, args.channel_bins)
    stats.save(args.out)
    print(f"wrote statistics of {len(stats.activations)} layers to {args.out} "
          f"({stats.info['tokens']} tokens in {stats.info['seconds']} s)")
    return 0


def run_eval(args, model: str, recipe: str, text: str | None, kernels: str) -> int:
    import torch

    from qcompiler.tools import evaluate, models

    if args.threads:
        torch.set_num_threads(args.threads)
    from qcompiler.config import resolve_recipe

    text_path = Path(text) if text else models.default_text()
    if not text_path.is_file():
        print(f"qcompiler: text file {text_path} not found (give --text or set QCOMPILER_DATA)", file=sys.stderr)
        return 2
    resolved = resolve_recipe(recipe)
    print(f"loading {model} ...", file=sys.stderr)
    loaded = models.load_model(model)
    from qcompiler.calibration.stats import resolve_stats

    stats = resolve_stats(getattr(args, "stats", None))
    calibration_seconds = None
    if stats is None and resolved.needs_calibration:
        stats = _calibrate(loaded, resolved, args.calib_text, args.samples, args.seq_len)
        calibration_seconds = stats.info["seconds"]
    options = BackendOptions(recipe=resolved, kernels=kernels, stats=stats)
    cfg = evaluate.EvalConfig(tokens=args.tokens, window=args.window, speed=not args.no_speed,
                              speed_repeats=args.repeats, inductor_baseline=args.inductor_baseline)
    result = evaluate.evaluate(loaded, options, text_path, cfg)
    if options.stats is not None:
        result.calibration = dict(options.stats.info)
        if calibration_seconds is not None:
            result.calibration["seconds"] = calibration_seconds
    print(evaluate.format_table(result))
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(result.to_json(), indent=2))
        print(f"wrote {args.json_out}", file=sys.stderr)
    return 0


def run_demo(args) -> int:
    from qcompiler.tools import chat

    code = run_eval(args, "smollm2-135m", "w8a8-dynamic", None, "fast")
    if code == 0:
        timing = chat.run_demo_generation("smollm2-135m", "w8a8-dynamic")
        if args.json_out:
            result = json.loads(Path(args.json_out).read_text())
            Path(args.json_out).write_text(json.dumps({**result, "generation": timing.to_json()}, indent=2))
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "eval":
            return run_eval(args, args.model, args.recipe, args.text, args.kernels)
        if args.command == "demo":
            return run_demo(args)
        if args.command == "calibrate":
            return run_calibrate(args)
        if args.command == "export":
            from qcompiler.tools.export import command as export_command

            return export_command.run(args, _calibrate, _example_batch)
        if args.command == "generate":
            return run_generate(args)
        if args.command == "bench":
            return run_bench(args)
        if args.command == "explain":
            return run_explain(args)
        if args.command == "quantize":
            return run_quantize(args)
        if args.command == "report":
            return run_report(args)
    except QCompilerError as exc:  # the user's to fix; anything else is a bug of ours and keeps its traceback
        print(f"qcompiler: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
