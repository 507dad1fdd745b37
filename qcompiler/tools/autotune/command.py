"""``qcompiler autotune``: the automatic mixed-precision recipe of a model under a bits-per-weight target.

    qcompiler autotune --model stories260k --target-bpw 11 --out auto/

writes ``auto/recipe.json`` (the Recipe: every command's ``--recipe auto/`` reads it, as does
``qcompiler.config.recipe_from_json``) and
``auto/autotune.json`` (every layer's choice, bits and sensitivity, every candidate's table, the arguments);
with ``--rounding gptq`` or ``awq`` also ``auto/stats/``, the recipe calibrated on the search's batches
(``--recipe auto/ --stats auto/stats``).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from qcompiler.config import AWQ, GPTQ, HQQ, recipe_to_json
from qcompiler.config.auto import CANDIDATES, DEFAULT_CANDIDATES, METRICS, AutoPrecision
from qcompiler.core.errors import ConfigError
from qcompiler.core.files import atomic_folder, check_output, read_text

RECIPE_FILE = "recipe.json"
RESULT_FILE = "autotune.json"
STATS_DIR = "stats"
ROUNDINGS = {"rtn": None, "hqq": HQQ(), "gptq": GPTQ(), "awq": AWQ()}  # --rounding


def add_arguments(p: argparse.ArgumentParser, model_help: str) -> None:
    p.add_argument("--model", required=True, help=model_help)
    p.add_argument("--target-bpw", type=float, required=True,
                   help="bits per weight of the whole model (embeddings, norms and LM head included)")
    p.add_argument("--candidates", nargs="+", default=list(DEFAULT_CANDIDATES),
                   help=f"schemes a layer may take (default all: {' '.join(CANDIDATES)})")
    p.add_argument("--metric", choices=METRICS, default=None,
                   help="kl: next-token KL of the logits (default for language models); mse: relative squared "
                        "error of the output (default for encoders)")
    p.add_argument("--rounding", choices=list(ROUNDINGS), default="rtn",
                   help="rtn: round to nearest (default); hqq: HQQ zero points (asymmetric candidates only); gptq, "
                        "awq: every quantized layer, calibrated per candidate on the search's batches (slower)")
    p.add_argument("--max-latency-ratio", type=float, default=None,
                   help="also keep the searched layers' decode-step time (timed per layer on this machine) within "
                        "this multiple of their float time, e.g. 0.8 (default: no latency budget)")
    p.add_argument("--no-embeddings", action="store_true",
                   help="keep the embedding tables float (default: the search also picks their weight-only scheme)")
    p.add_argument("--calib-text", default=None, help="calibration text (default: <data>/wikitext-2/valid.txt)")
    p.add_argument("--samples", type=int, default=AutoPrecision.samples,
                   help=f"calibration samples (default {AutoPrecision.samples})")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration sample (default 256)")
    p.add_argument("--cache", default="qcompiler-stats",
                   help="folder of the per-layer results, reused by a rerun (default ./qcompiler-stats)")
    p.add_argument("--out", required=True, help="folder to write recipe.json and autotune.json to")


def _search(args) -> AutoPrecision:
    """The search the arguments ask for, validated (before the model is loaded)."""
    return AutoPrecision(target_bpw=args.target_bpw, candidates=tuple(args.candidates), metric=args.metric or "kl",
                         rounding=ROUNDINGS[args.rounding], samples=args.samples,
                         seq_len=args.seq_len, max_latency_ratio=args.max_latency_ratio,
                         embeddings=not args.no_embeddings)


def _metric_for(auto: AutoPrecision, asked: str | None, kind: str) -> AutoPrecision:
    if kind != "encoder":
        return auto
    if asked == "kl":
        raise ConfigError("--metric kl needs next-token logits, and this model is an encoder: use --metric mse")
    return replace(auto, metric="mse")


def run(args) -> int:
    import torch

    from qcompiler.calibration.calibrate import text_batches
    from qcompiler.tools import models
    from qcompiler.tools.autotune.search import auto_recipe

    auto = _search(args)
    out = check_output(args.out, "--out", folder=True)
    check_output(args.cache, "--cache", folder=True, replaceable=lambda path: True)
    text = Path(args.calib_text) if args.calib_text else models.default_calibration_text()
    read_text(text, "calibration text")
    print(f"loading {args.model} ...", file=sys.stderr)
    loaded = models.load_model(args.model)
    auto = _metric_for(auto, args.metric, loaded.kind)
    ids = torch.cat(text_batches(loaded.tokenizer, text, auto.samples, auto.seq_len, add_bos=loaded.add_bos))
    result = auto_recipe(loaded.model, auto, [{"input_ids": ids}], cache=args.cache)
    print(result)
    stats = None
    if result.recipe.data_driven_rounding:
        from qcompiler.calibration.calibrate import calibrate

        print(f"calibrating {result.recipe.name} ({args.rounding}) on the search's batches ...", file=sys.stderr)
        stats = calibrate(loaded.model, [{"input_ids": ids}], result.recipe)
    doc = {"arguments": {k: v for k, v in vars(args).items() if k != "json_out"}, "calibration_text": str(text),
           **result.to_json()}
    with atomic_folder(out) as folder:
        (folder / RECIPE_FILE).write_text(json.dumps(recipe_to_json(result.recipe), indent=1))
        (folder / RESULT_FILE).write_text(json.dumps(doc, indent=1))
        if stats is not None:
            stats.save(folder / STATS_DIR)
    print(f"wrote {out / RECIPE_FILE} ({result.bits_per_weight:.4f} bits per weight) and {out / RESULT_FILE}"
          + (f"; its statistics in {out / STATS_DIR} (--recipe {out} --stats {out / STATS_DIR})" if stats else ""),
          file=sys.stderr)
    return 0
