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
    qcompiler autotune --model smollm2-135m --target-bpw 5.0 --out auto/
    qcompiler explain --model smollm2-135m --recipe auto/      # --recipe: a preset, a recipe JSON file or its folder
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from qcompiler.config import BackendOptions
from qcompiler.core.errors import ConfigError, QCompilerError
from qcompiler.core.files import check_output, read_text, write_text_atomic
from qcompiler.tools import cli_args


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
    from qcompiler.tools import models
    from qcompiler.tools.recipe_files import recipe_argument

    recipe = recipe_argument(args.recipe)
    loaded = models.load_model(args.model)
    stats = args.stats
    if stats is None and recipe.needs_calibration:
        stats = _calibrate(loaded, recipe, args.calib_text, args.samples, args.seq_len)
    batch = _example_batch(loaded, args.text, args.tokens)
    torch._dynamo.reset()
    qcompiler.clear_reports()
    options = {"recipe": recipe, "stats": stats, "other_weights": args.other_weights}
    with torch.inference_mode():
        torch.compile(loaded.model, backend="qcompiler", options=options)(**batch)
    print(format_plan(qcompiler.last_report()))
    if not args.no_errors:
        print()
        print(qcompiler.compare(loaded.model, recipe, batch, stats=stats, top=args.top,
                                other_weights=args.other_weights))
    return 0


def _example_batch(loaded, text, tokens: int) -> dict:
    from qcompiler.tools import evaluate, models

    path = Path(text) if text else models.default_text()
    ids = evaluate.read_tokens(path, loaded.tokenizer, tokens).unsqueeze(0)
    return {"input_ids": ids} if loaded.kind == "encoder" else {"input_ids": ids, "use_cache": False}


def run_quantize(args) -> int:
    from qcompiler import artifact
    from qcompiler.tools import models, quantize
    from qcompiler.tools.recipe_files import recipe_argument

    recipe = recipe_argument(args.recipe)
    artifact.check_output(args.out)  # before loading and calibrating: nothing is lost to a bad --out
    loaded = models.load_model(args.model)
    stats = args.stats
    if stats is None and recipe.needs_calibration:
        stats = _calibrate(loaded, recipe, args.calib_text, args.samples, args.seq_len)
    folder = quantize.quantize(loaded.model, recipe, _example_batch(loaded, args.text, args.tokens), args.out, stats,
                               other_weights=args.other_weights)
    manifest = json.loads((folder / artifact.MANIFEST).read_text())
    quantized = [layer for layer in manifest["layers"] if layer["quantized"]]
    size = manifest["size"]
    extra = f" + {size['extra_bytes']} bytes the transforms add" if size["extra_bytes"] else ""
    print(f"wrote {folder}: {len(quantized)} quantized layers, {size['tensor_bytes'] / 1e6:.1f} MB of tensors = "
          f"{size['bits_per_weight']:.4f} bits per weight (counted: {size['counted_bits_per_weight']:.4f}{extra}), "
          f"logits KL on the example batch {manifest['logits_kl_on_example']:.4g}")
    return 0


def run_report(args) -> int:
    import torch

    import qcompiler
    from qcompiler.calibration.stats import resolve_stats
    from qcompiler.tools import models, report_html
    from qcompiler.tools.recipe_files import labelled_recipes, recipe_argument

    recipe = recipe_argument(args.recipe)  # --recipe and --recipes are read and checked before any work
    others = labelled_recipes(args.recipes, taken=("fp32", recipe.name), calibration_free=True)
    loaded = models.load_model(args.model)
    stats = resolve_stats(args.stats)
    if stats is None and recipe.needs_calibration:
        stats = _calibrate(loaded, recipe, args.calib_text, args.samples, args.seq_len)
    batch = _example_batch(loaded, args.text, 256)
    torch._dynamo.reset()
    qcompiler.clear_reports()
    with torch.inference_mode():
        torch.compile(loaded.model, backend="qcompiler",
                      options={"recipe": recipe, "stats": stats, "other_weights": args.other_weights})(**batch)
    plan = format_plan(qcompiler.last_report())
    path = report_html.build(loaded, recipe, stats, Path(args.out), batch, {recipe.name: (recipe, stats),
                             **{label: (r, None) for label, r in others.items()}},
                             args.tokens, plan, other_weights=args.other_weights)
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
        write_text_atomic(args.json_out, json.dumps(result, indent=2))
        print(f"wrote {args.json_out}", file=sys.stderr)
    return 0


def run_generate(args) -> int:
    from qcompiler.tools import chat

    return chat.run_cli(args, _calibrate)


def _calibrate(loaded, recipe, text: str | None, samples: int, seq_len: int, channel_bins: int = 0):
    from qcompiler.calibration.calibrate import calibrate, text_batches
    from qcompiler.tools import models

    path = Path(text) if text else models.default_calibration_text()
    read_text(path, "calibration text")  # missing, a folder, binary: said now, before the model runs
    batches = text_batches(loaded.tokenizer, path, samples, seq_len, add_bos=loaded.add_bos)
    print(f"calibrating on {samples} x {seq_len} tokens of {path} ...", file=sys.stderr)
    return calibrate(loaded.model, batches, recipe, channel_bins=channel_bins)


def run_calibrate(args) -> int:
    from qcompiler.calibration.stats import CalibrationStats
    from qcompiler.tools import models
    from qcompiler.tools.recipe_files import recipe_argument

    CalibrationStats.check_output(args.out)  # before loading and calibrating: nothing is lost to a bad --out
    recipe = recipe_argument(args.recipe)
    loaded = models.load_model(args.model)
    stats = _calibrate(loaded, recipe, args.calib_text, args.samples, args.seq_len, args.channel_bins)
    stats.save(args.out)
    rounded = f", {len(stats.weights)} layers' weights rounded" if stats.weights else ""
    print(f"wrote statistics of {len(stats.activations)} layers{rounded} to {args.out} "
          f"({stats.info['tokens']} tokens in {stats.info['seconds']} s)")
    return 0


def _window(loaded, asked: int | None) -> int:
    """The scoring window: ``asked`` checked against the model's context (with the BOS token each window
    gets if the model takes one), or by default 512 tokens or what the context leaves."""
    context = getattr(getattr(loaded.model, "config", None), "max_position_embeddings", None)
    bos = 1 if loaded.add_bos else 0
    if asked is None:
        return 512 if context is None else min(512, context - bos)
    if context is not None and asked + bos > context:
        raise ConfigError(f"--window {asked}{' plus the BOS token' if bos else ''} is more than {loaded.name}'s "
                          f"context of {context} positions: give --window {context - bos} or less")
    return asked


def run_eval(args, model: str, recipe: str, text: str | None, kernels: str) -> int:
    import torch

    from qcompiler.tools import evaluate, models
    from qcompiler.tools.recipe_files import recipe_argument

    if args.threads:
        torch.set_num_threads(args.threads)
    text_path = Path(text) if text else models.default_text()
    read_text(text_path, "text file")  # missing, a folder, binary: said before the model is loaded
    resolved = recipe_argument(recipe)
    print(f"loading {model} ...", file=sys.stderr)
    loaded = models.load_model(model)
    window = _window(loaded, args.window)  # the model's context decides: checked before calibrating
    if args.tokens < window:
        raise ConfigError(f"--tokens {args.tokens} is fewer than one window of {window}: give more tokens or a "
                          "shorter --window")
    from qcompiler.calibration.stats import resolve_stats

    stats = resolve_stats(getattr(args, "stats", None))
    calibration_seconds = None
    if stats is None and resolved.needs_calibration:
        stats = _calibrate(loaded, resolved, args.calib_text, args.samples, args.seq_len)
        calibration_seconds = stats.info["seconds"]
    options = BackendOptions(recipe=resolved, kernels=kernels, stats=stats,
                             other_weights=getattr(args, "other_weights", False),
                             compiler=getattr(args, "compiler", "inductor"))
    cfg = evaluate.EvalConfig(tokens=args.tokens, window=window, speed=not args.no_speed,
                              speed_repeats=args.repeats, inductor_baseline=args.inductor_baseline)
    result = evaluate.evaluate(loaded, options, text_path, cfg)
    if options.stats is not None:
        result.calibration = dict(options.stats.info)
        if calibration_seconds is not None:
            result.calibration["seconds"] = calibration_seconds
    print(evaluate.format_table(result))
    if args.json_out:
        write_text_atomic(args.json_out, json.dumps(result.to_json(), indent=2))
        print(f"wrote {args.json_out}", file=sys.stderr)
    return 0


def run_demo(args) -> int:
    from qcompiler.tools import chat

    code = run_eval(args, "smollm2-135m", "w8a8-dynamic", None, "fast")
    if code == 0:
        timing = chat.run_demo_generation("smollm2-135m", "w8a8-dynamic")
        if args.json_out:
            result = json.loads(Path(args.json_out).read_text())
            write_text_atomic(args.json_out, json.dumps({**result, "generation": timing.to_json()}, indent=2))
    return code


def main(argv: list[str] | None = None) -> int:
    args = cli_args.build_parser().parse_args(argv)
    try:
        cli_args.check_numbers(args)
        if getattr(args, "json_out", None):  # before any work: a result is never lost to a bad --json
            check_output(args.json_out, "--json", folder=False)
        if args.command == "report":
            check_output(args.out, "--out", folder=True, replaceable=lambda folder: True)  # index.html is rewritten
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
        if args.command == "autotune":
            from qcompiler.tools.autotune import command as autotune_command

            return autotune_command.run(args)
    except Exception as exc:  # the user's errors are reported; anything else is re-raised
        error = users_error(exc)
        if error is None:  # a bug of ours keeps its traceback
            raise
        print(f"qcompiler: {error}", file=sys.stderr)
        return 2
    return 1


def users_error(exc: BaseException) -> QCompilerError | None:
    """The :class:`QCompilerError` ``exc`` is, or the one raised inside the backend that Dynamo wrapped in
    its ``BackendCompilerFailed`` (``.inner_exception``); None for anything else."""
    if isinstance(exc, QCompilerError):
        return exc
    if "torch" not in sys.modules:  # nothing compiled, so nothing wrapped
        return None
    from torch._dynamo.exc import BackendCompilerFailed

    inner = getattr(exc, "inner_exception", None)
    return inner if isinstance(exc, BackendCompilerFailed) and isinstance(inner, QCompilerError) else None


if __name__ == "__main__":
    sys.exit(main())
