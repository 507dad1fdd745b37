"""Automatic mixed precision against uniform recipes, in one run: bits per weight of the whole model (every
parameter, counted as ``qcompiler autotune`` counts them) and accuracy on the evaluation text.

For each budget the search (``qcompiler.tools.autotune.search.auto_recipe``, the CLI's defaults: 3 x 256
calibration tokens of wikitext-2/valid.txt, every default candidate, the embedding tables searched; its
per-layer results are read from ``--cache`` when ``qcompiler autotune`` filled it) gives a recipe; it and the
uniform recipes are compiled side by side and evaluated as ``qcompiler eval`` does: causal LMs on the first
``--tokens`` tokens of wiki.test.raw in 512-token windows (perplexity, KL to float, top-1 agreement),
encoders (MiniLM) by the cosine similarity of mean-pooled embeddings to float on 256 WikiText-2 paragraphs.

Uniform recipes: the presets named by ``--presets`` (as they are: LM head and embeddings float), and
``uniform-<candidate>``: every linear layer, the LM head and the embedding tables on one candidate (the
corners of the search's space). A budget below the least the model can take is reported with that least.

    python examples/autotune_table.py --model smollm2-135m --budgets 4.5 5 6 8 --artifacts --json smol.json
    python examples/autotune_table.py --model minilm-l6 --budgets 4.5 5 6 8 --json minilm.json
    python examples/autotune_table.py --model smollm2-135m --budgets 5.5 6 8 --rounding hqq --presets \
        --uniform w4-g128 w4-g64 --json smol-hqq.json

With ``--rounding gptq`` or ``awq`` every recipe that needs statistics (the automatic ones, the uniform ones,
GPTQ/AWQ presets) is calibrated on the search's batches before it is compiled (as ``qcompiler autotune`` does).
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from qcompiler import report
from qcompiler.calibration.calibrate import calibrate, text_batches
from qcompiler.config import resolve_recipe
from qcompiler.config.auto import CANDIDATES, AutoPrecision, uniform_recipe
from qcompiler.core.errors import ConfigError
from qcompiler.tools import evaluate, models, quantize
from qcompiler.tools.autotune.command import ROUNDINGS
from qcompiler.tools.autotune.search import auto_recipe
from qcompiler.tools.model_bits import model_bits, model_bits_per_weight


def compiled_variant(loaded, recipe, example, stats=None):
    torch._dynamo.reset()
    report.clear_reports()
    compiled = torch.compile(loaded.model, backend="qcompiler", options={"recipe": recipe, "stats": stats})
    with torch.inference_mode():  # compile now, to read the report
        compiled(**example)
    return compiled, report.last_report()


def artifact_size(model, recipe, example, stats, bits: int) -> dict:
    """The bytes of ``recipe``'s artifact (written to a temporary folder and removed): its tensors, and what
    the transforms add beyond the ``bits`` counted (static ranges, SmoothQuant scales; zero without them)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = quantize.quantize(model, recipe, example, Path(tmp) / "artifact", stats, errors=False)
        size = json.loads((folder / "manifest.json").read_text())["size"]
    if size["counted_bits"] != bits:
        raise SystemExit(f"{recipe.name}: the artifact's manifest counts {size['counted_bits']} bits, the compiled "
                         f"model {bits}")
    return {"artifact_bytes": size["tensor_bytes"], "artifact_bpw": size["bits_per_weight"],
            "artifact_extra_bytes": size["extra_bytes"]}


def main(argv=None) -> int:  # long: the steps of one table in order
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--budgets", type=float, nargs="+", default=[4.5, 5.0, 6.0, 8.0])
    parser.add_argument("--presets", nargs="*", default=["w8a8-dynamic", "w4a16-rtn", "w4a16-hqq"])
    parser.add_argument("--uniform", nargs="*", default=["w8a8-dynamic", "w8-channel", "w4-g128", "w4-g64"],
                        help="candidates to put every layer and table on")
    parser.add_argument("--rounding", choices=list(ROUNDINGS), default="rtn",
                        help="the search's rounding (hqq: HQQ zero points on the asymmetric candidates; gptq, awq: "
                             "every quantized layer, calibrated on the search's batches)")
    parser.add_argument("--tokens", type=int, default=20480)
    parser.add_argument("--cache", default="qcompiler-stats")
    parser.add_argument("--json", dest="json_out")
    parser.add_argument("--artifacts", action="store_true",
                        help="also write each recipe's artifact (qcompiler quantize, to a temporary folder) and record "
                             "its tensors' bytes: the automatic and uniform recipes' equal the bits counted")
    args = parser.parse_args(argv)

    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 1024
    loaded = models.load_model(args.model)
    encoder = loaded.kind == "encoder"
    rounding = ROUNDINGS[args.rounding]
    suffix = "" if rounding is None else f"-{args.rounding}"
    base = AutoPrecision(target_bpw=8.0, metric="mse" if encoder else "kl", rounding=rounding)
    ids = torch.cat(text_batches(loaded.tokenizer, models.default_calibration_text(), base.samples, base.seq_len,
                                 add_bos=loaded.add_bos))
    # compile each variant on the shape it is evaluated on (one graph each)
    if encoder:
        batches = evaluate.encoder_batches(loaded.tokenizer, evaluate._passages(models.default_text(), 256))
        example = batches[0]
    else:
        tokens = evaluate.read_tokens(models.default_text(), loaded.tokenizer, args.tokens)
        windows = evaluate.windows(tokens, 512, loaded.tokenizer.bos_token_id if loaded.add_bos else None)
        example = {"input_ids": windows[0], "use_cache": False}
    recipes, infeasible, searched = {}, {}, {}
    for budget in args.budgets:
        auto = AutoPrecision(target_bpw=budget, metric=base.metric, rounding=rounding, name=f"auto-{budget:g}bpw{suffix}")
        start = time.perf_counter()
        try:
            result = auto_recipe(loaded.model, auto, [{"input_ids": ids}], cache=args.cache)
        except ConfigError as exc:
            infeasible[auto.recipe_name] = str(exc)
            print(f"budget {budget:g}: {exc}", file=sys.stderr)
            continue
        recipes[result.recipe.name] = result.recipe
        searched[result.recipe.name] = {"search_seconds": time.perf_counter() - start, "search_bits": result.bits,
                                        "choices": {c.module: c.candidate for c in result.layers}}
    for name in args.presets:
        recipes[name] = resolve_recipe(name)
    for name in args.uniform:
        recipes[f"uniform-{name}{suffix}"] = uniform_recipe(base, CANDIDATES[name])

    variants, results = {}, {}
    for name, recipe in recipes.items():
        stats = calibrate(loaded.model, [{"input_ids": ids}], recipe) if recipe.needs_calibration else None
        compiled, rep = compiled_variant(loaded, recipe, example, stats)
        variants[name] = compiled
        bits = model_bits(loaded.model, rep.layers)
        results[name] = {"bpw": model_bits_per_weight(loaded.model, rep.layers), "bits": bits,
                         "kind": "auto" if name in searched else "uniform", **searched.get(name, {})}
        if name in searched and bits != searched[name]["search_bits"]:
            raise SystemExit(f"{name}: the compiled model stores {bits} bits, the search counted "
                             f"{searched[name]['search_bits']}")
        if args.artifacts:
            results[name].update(artifact_size(loaded.model, recipe, example, stats, bits))
        print(f"{name}: {results[name]['bpw']:.4f} bpw", file=sys.stderr)

    floats = {}
    with torch.inference_mode():
        if encoder:
            metrics = evaluate.encoder_metrics(loaded.model, variants, batches)
        else:
            floats, metrics = evaluate.causal_lm_metrics(loaded.model, variants, windows)
    for name, m in metrics.items():
        results[name].update(m)

    metric = "cosine_similarity" if encoder else "perplexity"
    print(f"\n{args.model}: float {floats.get('perplexity', 1.0):.4g}")
    for name, r in sorted(results.items(), key=lambda kv: kv[1]["bpw"]):
        extra = (f"min {r['cosine_similarity_min']:.4f}" if encoder
                 else f"KL {r['kl']:.4f}  top-1 {100 * r['top1_agreement']:.1f}%")
        stored = f"  artifact {r['artifact_bpw']:.4f} bpw" if "artifact_bpw" in r else ""
        print(f"{name:<24} {r['bpw']:7.4f} bpw{stored}  {metric} {r[metric]:.4f}  {extra}")
    for name, why in infeasible.items():
        print(f"{name:<24} infeasible: {why}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"model": args.model, "float": floats, "tokens": args.tokens, "metric": metric,
                       "calibration": f"{base.samples} x {base.seq_len} tokens of wikitext-2/valid.txt",
                       "threads": torch.get_num_threads(), "results": results, "infeasible": infeasible}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
