"""Weight-only quantization side by side: RTN / HQQ / GPTQ / AWQ at 4 and 3 bits (group 128), and
torchao's int4 weight-only (its default and its HQQ option), on one model and one text, in one run.

Causal LMs: every window of the text runs through the float model once and through every quantized
variant; perplexity, KL to float and top-1 agreement are accumulated per variant (the same windows
and convention as ``qcompiler eval``). Encoders (MiniLM): cosine similarity of mean-pooled
embeddings to float on WikiText-2 paragraphs. Also reported: bits per weight as stored (from the
compile report; for torchao from its tensors) and the quantization time (calibration + rounding
passes; Inductor's compile time is not counted).

    python examples/weight_only_table.py --model smollm2-135m --json smol.json
    python examples/weight_only_table.py --model minilm-l6 --json minilm.json

torchao is optional: ``pip install --no-deps torchao`` (next to torch 2.13) to get its rows. Its int4
layers get bf16 activations, as qcompiler's do (``--torchao-fp32``: fp32, far slower on CPU).
"""

import argparse
import copy
import json
import math
import sys
import time

import torch

import qcompiler
from qcompiler import AWQ, GPTQ, HQQ, Recipe, WeightScheme, report
from qcompiler.calibration.calibrate import text_batches
from qcompiler.tools import evaluate, models

# awq: scales shared per input and folded into the model (the default, exports); awq-per-layer: every layer
# its own s, its input divided at run time (AWQ(foldable=False); float zero points before 2026-12-05)
METHODS = {"rtn": None, "hqq": HQQ(), "gptq": GPTQ(), "awq": AWQ(), "awq-per-layer": AWQ(foldable=False)}


def recipe_for(method: str, bits: int, group: int) -> Recipe:
    weight = WeightScheme(bits=bits, granularity="per_group", group_size=group, symmetric=False)
    return Recipe(name=f"w{bits}a16-{method}", weight=weight, activation=None, rounding=METHODS[method])


def torchao_variants(model, group: int, bf16_linears: bool):
    try:
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
        from torchao.quantization import quantize_
    except ImportError:
        print("torchao not installed: its rows are skipped (pip install --no-deps torchao)", file=sys.stderr)
        return {}
    def selected(mod, fqn):
        return (isinstance(mod, torch.nn.Linear) and "lm_head" not in fqn and mod.out_features % 16 == 0
                and mod.in_features % group == 0)

    out = {}
    for alg in ("tinygemm", "hqq"):
        start = time.perf_counter()
        m = copy.deepcopy(model)
        if bf16_linears:
            # ATen's CPU int4 kernel is vectorized for bf16 activations (fp32 ones ran ~100x slower here);
            # qcompiler's int4 layers round their input to bf16 the same way, the rest of the model stays fp32
            for fqn, mod in m.named_modules():
                if selected(mod, fqn):
                    mod.to(torch.bfloat16)
                    mod.register_forward_pre_hook(lambda _, args: (args[0].to(torch.bfloat16),) + args[1:])
                    mod.register_forward_hook(lambda _, args, result: result.float())
        quantize_(m, PrototypeInt4WeightOnlyConfig(group_size=group, int4_choose_qparams_algorithm=alg),
                  filter_fn=selected)
        seconds = time.perf_counter() - start
        bits, count = 0, 0
        for mod in m.modules():
            w = getattr(mod, "weight", None)
            if type(w).__name__ == "Int4OpaqueTensor":
                stored = sum(getattr(w, n).numel() * getattr(w, n).element_size() for n in w.tensor_data_names)
                bits += 8 * stored
                count += math.prod(w.shape)
        out[f"torchao int4 ({alg})"] = {"model": m, "bpw": bits / count, "quant_seconds": seconds}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=20480)
    parser.add_argument("--samples", type=int, default=128, help="calibration samples")
    parser.add_argument("--seq-len", type=int, default=512, help="calibration tokens per sample")
    parser.add_argument("--no-torchao", action="store_true")
    parser.add_argument("--torchao-fp32", action="store_true",
                        help="give torchao's int4 layers fp32 activations (default: bf16, as qcompiler's int4 kernel)")
    parser.add_argument("--json", dest="json_out")
    args = parser.parse_args(argv)

    # every variant compiles the same forward with its own backend options: allow that many graphs
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 1024
    loaded = models.load_model(args.model)
    encoder = loaded.kind == "encoder"
    seq_len = 128 if encoder else args.seq_len
    batches = text_batches(loaded.tokenizer, models.default_calibration_text(), args.samples, seq_len,
                           add_bos=loaded.add_bos)
    variants = {}
    for bits in args.bits:
        for method in args.methods:
            recipe = recipe_for(method, bits, args.group)
            stats, seconds = None, 0.0
            if recipe.needs_calibration:
                print(f"calibrating {recipe.name} on {args.samples} x {seq_len} tokens ...", file=sys.stderr)
                torch._dynamo.reset()
                start = time.perf_counter()
                stats = qcompiler.calibrate(loaded.model, batches, recipe)
                seconds = time.perf_counter() - start
            torch._dynamo.reset()
            report.clear_reports()
            compiled = torch.compile(loaded.model, backend="qcompiler", options={"recipe": recipe, "stats": stats})
            with torch.inference_mode():  # compile now, to read the report
                if encoder:
                    compiled(input_ids=batches[0])
                else:
                    compiled(input_ids=batches[0], use_cache=False)
            rep = report.last_report()
            quantized = rep.quantized
            weights = [8 * d.weight_bytes / d.bits_per_weight for d in quantized]  # weights per layer
            bpw = sum(8 * d.weight_bytes for d in quantized) / sum(weights)
            variants[recipe.name] = {"model": compiled, "bpw": bpw, "quant_seconds": seconds + rep.seconds,
                                     "layers": len(quantized)}
            print(f"{recipe.name}: {len(quantized)} layers, {bpw:.3f} bpw, {seconds + rep.seconds:.1f} s",
                  file=sys.stderr)
    if not args.no_torchao and 4 in args.bits:
        variants.update(torchao_variants(loaded.model, args.group, bf16_linears=not args.torchao_fp32))

    results = {name: {k: v for k, v in info.items() if k != "model"} for name, info in variants.items()}
    models_ = {name: info["model"] for name, info in variants.items()}
    floats = {}
    with torch.inference_mode():
        if encoder:
            batches = evaluate.encoder_batches(loaded.tokenizer, evaluate._passages(models.default_text(), 256))
            metrics = evaluate.encoder_metrics(loaded.model, models_, batches)
        else:
            ids = evaluate.read_tokens(models.default_text(), loaded.tokenizer, args.tokens)
            windows = evaluate.windows(ids, 512, loaded.tokenizer.bos_token_id if loaded.add_bos else None)
            floats, metrics = evaluate.causal_lm_metrics(loaded.model, models_, windows)
    for name, m in metrics.items():
        results[name].update(m)

    metric = "cosine_similarity" if encoder else "perplexity"
    print(f"\n{args.model}: float {floats.get('perplexity', 1.0) if not encoder else 1.0:.4g}")
    for name, r in results.items():
        extra = (f"min {r['cosine_similarity_min']:.4f}" if encoder
                 else f"KL {r['kl']:.4f}  top-1 {100 * r['top1_agreement']:.1f}%")
        print(f"{name:<24} {metric} {r[metric]:.4f}  {extra}  {r['bpw']:.3f} bpw  {r['quant_seconds']:.1f} s")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"model": args.model, "float": floats, "group": args.group, "tokens": args.tokens,
                       "calibration": f"{args.samples} x {seq_len} tokens of wikitext-2/valid.txt",
                       "threads": torch.get_num_threads(), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
