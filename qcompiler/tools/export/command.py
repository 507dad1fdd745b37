"""``qcompiler export``: a quantized model as a compressed-tensors folder (vLLM, Hugging Face
transformers) or a folder holding one GGUF file (llama.cpp).

GGUF blocks store fp16 scales (and Q4_1 an fp16 offset), so a GGUF export takes a recipe that chose its
integers for such scales: the ``w8a16-q8_0`` and ``w4a16-q4_*`` presets (``WeightScheme(fp16_scales=True)``,
groups of 32); other recipes are refused before any work rather than written with different weights.

    qcompiler export --model smollm2-135m --recipe w8a8-dynamic --format compressed-tensors --out smol-w8a8/
    qcompiler export --model smollm2-135m --recipe w4a16-q4_0-gptq --format gguf --gguf-type Q4_0 --out smol-q4_0/
"""

from __future__ import annotations

import argparse
import sys

from qcompiler.core.errors import ConfigError, ExportError
from qcompiler.core.files import check_output

FORMATS = ("compressed-tensors", "gguf")
GGUF_TYPES = ("Q8_0", "Q4_0", "Q4_1")
GGUF_PRESETS = {"Q8_0": "w8a16-q8_0", "Q4_0": "w4a16-q4_0-gptq or w4a16-q4_0-awq", "Q4_1": "w4a16-q4_1-gptq or w4a16-q4_1-hqq"}


def add_arguments(p: argparse.ArgumentParser, model_help: str, recipe_help: str) -> None:
    p.add_argument("--model", required=True, help=model_help)
    p.add_argument("--recipe", default="w8a8-dynamic", help=recipe_help)
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="compressed-tensors: a folder for vLLM / transformers; gguf: a folder with one GGUF "
                        "file for llama.cpp (needs --gguf-type and a recipe with fp16 scales in groups of 32)")
    p.add_argument("--gguf-type", dest="gguf_type", default=None, choices=GGUF_TYPES,
                   help="GGUF block type of the quantized linears (--format gguf): Q8_0 (w8a16-q8_0), Q4_0 "
                        "(w4a16-q4_0-gptq, w4a16-q4_0-awq), Q4_1 (w4a16-q4_1-gptq, w4a16-q4_1-hqq)")
    p.add_argument("--gguf-embeddings", dest="gguf_embeddings", default="Q8_0", choices=("Q8_0", "F16", "F32"),
                   help="GGUF type of the token embedding and a float LM head (default Q8_0, as llama.cpp's "
                        "Q4_0/Q8_0 files)")
    p.add_argument("--out", required=True, help="folder to write (absent or empty)")
    p.add_argument("--stats", default=None, help="calibration folder (default: calibrate now if the recipe needs it)")
    p.add_argument("--text", default=None, help="text whose first --tokens tokens are the example batch")
    p.add_argument("--tokens", type=int, default=64, help="tokens in the example batch (default 64)")
    p.add_argument("--calib-text", dest="calib_text", default=None,
                   help="calibration text (default: <data>/wikitext-2/valid.txt)")
    p.add_argument("--samples", type=int, default=128, help="calibration samples (default 128)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sample (default 512)")


def check_gguf_recipe(recipe, gguf_type: str) -> None:
    """An :class:`ExportError` before any work when ``recipe``'s weights can not be written as ``gguf_type``
    exactly: fp16 scales, blocks of 32 (a group size that is a multiple of 32, or per channel), at most
    8 bits (Q8_0) or 4 bits (Q4_0, Q4_1), symmetric for Q8_0 and Q4_0."""
    from qcompiler.config import resolve_recipe

    if gguf_type not in GGUF_TYPES:
        raise ExportError(f"--gguf-type must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}")
    recipe = resolve_recipe(recipe)
    use = f"use --recipe {GGUF_PRESETS[gguf_type]}"
    schemes = [("the recipe's weights", recipe.weight)] + [
        (f"override {o.pattern!r}", o.weight) for o in recipe.overrides if o.weight is not None]
    for what, w in schemes:
        if not w.fp16_scales:
            raise ExportError(f"recipe {recipe.name!r}: {what} ({w.describe()}) have float32 scales, and GGUF "
                             f"stores fp16 scales: the file would hold other weights than qcompiler measured; {use} "
                             "(or a recipe with WeightScheme(fp16_scales=True))")
        if w.granularity == "per_tensor" or (w.granularity == "per_group" and w.group_size % 32):
            raise ExportError(f"recipe {recipe.name!r}: {what} ({w.describe()}): GGUF {gguf_type} stores blocks "
                             f"of 32 input channels: quantize in groups of 32, 64, 128 or per channel; {use}")
        limit = 8 if gguf_type == "Q8_0" else 4
        if w.bits > limit:
            raise ExportError(f"recipe {recipe.name!r}: {what} are {w.bits}-bit, more than {gguf_type} holds "
                             f"({limit}); {use}")
        if gguf_type in ("Q8_0", "Q4_0") and not w.symmetric:
            raise ExportError(f"recipe {recipe.name!r}: {what} are asymmetric, and {gguf_type} holds d * q only: "
                             f"{use}, or export as Q4_1")


def run(args, calibrate, example_batch) -> int:
    """``calibrate(loaded, recipe, text, samples, seq_len)`` gathers statistics; ``example_batch(loaded,
    text, tokens)`` gives the batch the graph is traced on."""
    from qcompiler.calibration.stats import resolve_stats
    from qcompiler.tools import models
    from qcompiler.tools.export import build
    from qcompiler.tools.recipe_files import recipe_argument

    out = check_output(args.out, "--out", folder=True)  # before any work: absent or empty, writable
    recipe = recipe_argument(args.recipe)  # a preset, or a recipe file read and validated now
    build.refuse_transforms(recipe)  # before loading or calibrating anything
    if args.format == "gguf":
        if args.gguf_type is None:
            raise ConfigError(f"--format gguf needs --gguf-type ({', '.join(GGUF_TYPES)})")
        check_gguf_recipe(recipe, args.gguf_type)
    elif args.gguf_type is not None:
        raise ConfigError("--gguf-type applies to --format gguf only")
    if args.tokens < 2:
        raise ConfigError(f"--tokens must be at least 2, got {args.tokens}")
    stats = resolve_stats(args.stats)
    loaded = models.load_model(args.model)
    if loaded.kind != "causal-lm":
        raise ExportError(f"{args.model} is not a causal language model: the export formats here are for LLMs")
    if args.format == "gguf":
        from qcompiler.tools.export.gguf import check_architecture

        check_architecture(loaded.model.config.to_dict())
    if stats is None and recipe.needs_calibration:
        stats = calibrate(loaded, recipe, args.calib_text, args.samples, args.seq_len)
    print(f"quantizing {args.model} with {recipe.name} ...", file=sys.stderr)
    model = build.export_model(loaded, recipe, example_batch(loaded, args.text, args.tokens), stats,
                               other_weights=args.other_weights)
    if args.format == "gguf":
        from qcompiler.tools.export.gguf_folder import write_gguf_folder

        path = write_gguf_folder(model, out, args.gguf_type, embedding_type=args.gguf_embeddings)
        print(f"wrote {path}: {len(model.linears)} quantized linear layers (GGUF {args.gguf_type})")
        return 0
    from qcompiler.tools.export.compressed_tensors import round_zero_points, write_compressed_tensors

    model, note = round_zero_points(model)
    if note is not None:
        print(f"note: {note}", file=sys.stderr)
    path = write_compressed_tensors(model, out)
    print(f"wrote {path}: {len(model.linears)} quantized linear layers ({args.format})")
    return 0
