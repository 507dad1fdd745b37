"""``qcompiler export``: a quantized model as a compressed-tensors folder (vLLM, Hugging Face
transformers). GGUF (llama.cpp) is not offered yet: its blocks store fp16 scales, and the recipes choose
their integers for fp32 scales, so the writer (``gguf.py``, tested on its own) refuses them rather than
write weights that differ from the ones measured.

    qcompiler export --model smollm2-135m --recipe w8a8-dynamic --format compressed-tensors --out smol-w8a8/
"""

from __future__ import annotations

import argparse
import sys

from qcompiler.core.errors import ConfigError, ExportError
from qcompiler.core.files import check_output

FORMATS = ("compressed-tensors",)


def add_arguments(p: argparse.ArgumentParser, model_help: str, presets: str) -> None:
    p.add_argument("--model", required=True, help=model_help)
    p.add_argument("--recipe", default="w8a8-dynamic", help=f"preset: {presets}")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="compressed-tensors: a folder for vLLM / transformers (GGUF is not offered yet)")
    p.add_argument("--out", required=True, help="folder to write (absent or empty)")
    p.add_argument("--stats", default=None, help="calibration folder (default: calibrate now if the recipe needs it)")
    p.add_argument("--text", default=None, help="text whose first --tokens tokens are the example batch")
    p.add_argument("--tokens", type=int, default=64, help="tokens in the example batch (default 64)")
    p.add_argument("--calib-text", dest="calib_text", default=None,
                   help="calibration text (default: <data>/wikitext-2/valid.txt)")
    p.add_argument("--samples", type=int, default=128, help="calibration samples (default 128)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sample (default 512)")


def run(args, calibrate, example_batch) -> int:
    """``calibrate(loaded, recipe, text, samples, seq_len)`` gathers statistics; ``example_batch(loaded,
    text, tokens)`` gives the batch the graph is traced on."""
    from qcompiler.calibration.stats import resolve_stats
    from qcompiler.config import resolve_recipe
    from qcompiler.tools import models
    from qcompiler.tools.export import build

    out = check_output(args.out, "--out", folder=True)  # before any work: absent or empty, writable
    recipe = resolve_recipe(args.recipe)
    build.refuse_transforms(recipe)  # before loading or calibrating anything
    if args.tokens < 2:
        raise ConfigError(f"--tokens must be at least 2, got {args.tokens}")
    stats = resolve_stats(args.stats)
    loaded = models.load_model(args.model)
    if loaded.kind != "causal-lm":
        raise ExportError(f"{args.model} is not a causal language model: the export formats here are for LLMs")
    if stats is None and recipe.needs_calibration:
        stats = calibrate(loaded, recipe, args.calib_text, args.samples, args.seq_len)
    print(f"quantizing {args.model} with {recipe.name} ...", file=sys.stderr)
    model = build.export_model(loaded, recipe, example_batch(loaded, args.text, args.tokens), stats,
                               other_weights=args.other_weights)
    from qcompiler.tools.export.compressed_tensors import write_compressed_tensors

    path = write_compressed_tensors(model, out)
    print(f"wrote {path}: {len(model.linears)} quantized linear layers ({args.format})")
    return 0
