"""The ``qcompiler`` command line.

    qcompiler eval --model smollm2-135m --recipe w8a8-dynamic --text ../shared/data/wikitext-2-raw/wiki.test.raw
    qcompiler demo
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qcompiler.config import PRESETS, BackendOptions


def _add_eval_args(p: argparse.ArgumentParser, demo: bool) -> None:
    if not demo:
        p.add_argument("--model", required=True, help="alias (smollm2-135m, stories260k, minilm-l6), HF folder or .gguf file")
        p.add_argument("--recipe", default="w8a8-dynamic", help=f"preset: {', '.join(sorted(PRESETS))}")
        p.add_argument("--text", default=None, help="evaluation text (default: <data>/wikitext-2-raw/wiki.test.raw)")
        p.add_argument("--kernels", default="fast", choices=["fast", "reference"])
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
    _add_eval_args(sub.add_parser("demo", help="eval SmolLM2-135M with w8a8-dynamic on WikiText-2"), demo=True)
    return parser


def run_eval(args, model: str, recipe: str, text: str | None, kernels: str) -> int:
    import torch

    from qcompiler import evaluate, models

    if args.threads:
        torch.set_num_threads(args.threads)
    options = BackendOptions(recipe=recipe, kernels=kernels)
    text_path = Path(text) if text else models.default_text()
    if not text_path.is_file():
        print(f"qcompiler: text file {text_path} not found (give --text or set QCOMPILER_DATA)", file=sys.stderr)
        return 2
    print(f"loading {model} ...", file=sys.stderr)
    loaded = models.load_model(model)
    cfg = evaluate.EvalConfig(tokens=args.tokens, window=args.window, speed=not args.no_speed,
                              speed_repeats=args.repeats, inductor_baseline=args.inductor_baseline)
    result = evaluate.evaluate(loaded, options, text_path, cfg)
    print(evaluate.format_table(result))
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(result.to_json(), indent=2))
        print(f"wrote {args.json_out}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "eval":
            return run_eval(args, args.model, args.recipe, args.text, args.kernels)
        if args.command == "demo":
            return run_eval(args, "smollm2-135m", "w8a8-dynamic", None, "fast")
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"qcompiler: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
