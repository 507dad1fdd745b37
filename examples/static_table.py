"""Static per-tensor W8A8 on SmolLM2 with every activation observer: one calibration, one process.

Writes ``eval_smollm2_<recipe>.json`` per recipe into OUT (the README's static-observer table):

    python examples/static_table.py docs/results
"""

import dataclasses
import json
import sys

import torch

from qcompiler.calibration.calibrate import calibrate, text_batches
from qcompiler.config import PRESETS, BackendOptions
from qcompiler.tools import evaluate, models


def main(out: str) -> int:
    loaded = models.load_model("smollm2-135m")
    batches = text_batches(loaded.tokenizer, models.default_calibration_text(), 128, 512, add_bos=loaded.add_bos)
    stats = calibrate(loaded.model, batches, "w8a8-static")
    print("calibration seconds", stats.info["seconds"], flush=True)
    recipes = {name: name for name in
               ("w8a8-static", "w8a8-static-ema", "w8a8-static-percentile", "w8a8-static-mse", "w8a8-static-kl")}
    base = PRESETS["w8a8-static-percentile"]
    for q in (99.999, 99.9999):  # the same statistics, a wider percentile
        name = f"w8a8-static-percentile-{q}"
        recipes[name] = dataclasses.replace(base, name=name, activation=dataclasses.replace(base.activation, percentile=q))
    cfg = evaluate.EvalConfig(speed=False, progress=False)
    for name, recipe in recipes.items():
        torch._dynamo.reset()
        result = evaluate.evaluate(loaded, BackendOptions(recipe=recipe, stats=stats), models.default_text(), cfg)
        result.calibration = dict(stats.info)
        doc = result.to_json()
        doc["command"] = "python examples/static_table.py OUT"
        with open(f"{out}/eval_smollm2_{name}.json", "w") as f:
            json.dump(doc, f, indent=1)
        print(name, result.quantized["perplexity"], result.quantized["kl"], result.quantized["top1_agreement"], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "."))
