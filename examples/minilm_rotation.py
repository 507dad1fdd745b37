"""MiniLM-L6 (post-norm: the rotation's fallback, an online Hadamard transform on every quantized linear's
input) against the same recipes unrotated, in one process: cosine similarity of mean-pooled embeddings to fp32
on WikiText-2 passages, then encoding speed (8 x 128 tokens, every model in turn, median of the repeats).

    PYTHONPATH=. python examples/minilm_rotation.py [--passages 256] [--samples 128] [--repeats 20] [--json OUT]

GPTQ calibrates on ``--samples`` windows of 128 tokens of ``wikitext-2/valid.txt``. The speed rows use
round-to-nearest 4-bit weights (the same kernels as GPTQ's) so that they need no calibration."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace

import torch

import qcompiler
from qcompiler.calibration.calibrate import text_batches
from qcompiler.config import GPTQ, BackendOptions, Rotation
from qcompiler.tools import evaluate, models

P = qcompiler.PRESETS
ACCURACY = {
    "w8a8-dynamic": P["w8a8-dynamic"],
    "w8a8-dynamic-rotated": P["w8a8-dynamic-rotated"],
    "w4a16-gptq": P["w4a16-gptq"],
    "w4a16-gptq-act-order": replace(P["w4a16-gptq"], name="w4a16-gptq-act-order", rounding=GPTQ(act_order=True)),
    "w4a16-rotated-gptq": P["w4a16-rotated-gptq"],
}
SPEED = [P["w8a8-dynamic"], P["w8a8-dynamic-rotated"], P["w4a16-rtn"],
         replace(P["w4a16-rtn"], name="w4a16-rtn-rotated", rotation=Rotation())]


def accuracy(loaded, passages: int, samples: int) -> dict:
    batches = text_batches(loaded.tokenizer, models.default_calibration_text(), samples, 128, add_bos=loaded.add_bos)
    cfg = evaluate.EvalConfig(passages=passages, speed=False, progress=False)
    out = {}
    for name, recipe in ACCURACY.items():
        torch._dynamo.reset()
        stats = qcompiler.calibrate(loaded.model, batches, recipe, progress=False) if recipe.needs_calibration else None
        torch._dynamo.reset()
        result = evaluate.evaluate(loaded, BackendOptions(recipe=recipe, stats=stats), models.default_text(), cfg)
        rotate = next((r.transforms["rotate"] for r in qcompiler.reports() if "rotate" in r.transforms), None)
        out[name] = {**result.quantized, "rotate": rotate}
        print(f"{name:22s} cosine {result.quantized['cosine_similarity']:.4f} "
              f"(min {result.quantized['cosine_similarity_min']:.4f})", flush=True)
    return out


def speed(loaded, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, loaded.model.config.vocab_size, (8, 128), generator=gen),
             "attention_mask": torch.ones(8, 128, dtype=torch.long)}
    compiled = {"fp32": loaded.model}
    for recipe in SPEED:
        compiled[recipe.name] = evaluate.compile_quantized(loaded.model, BackendOptions(recipe=recipe))
    times = {name: [] for name in compiled}
    with torch.inference_mode():
        for model in compiled.values():  # compiles, warms up
            for _ in range(3):
                model(**batch)
        for _ in range(repeats):  # in turn: every model sees the same machine state
            for name, model in compiled.items():
                start = time.perf_counter()
                model(**batch)
                times[name].append(time.perf_counter() - start)
    ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
    for name, value in ms.items():
        print(f"{name:22s} {value:8.2f} ms  ({ms['fp32'] / value:.2f}x fp32)")
    return ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passages", type=int, default=256)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    loaded = models.load_model("minilm-l6")
    result = {"accuracy": accuracy(loaded, args.passages, args.samples),
              "encode_8x128_ms": speed(loaded, args.repeats), "threads": torch.get_num_threads()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
