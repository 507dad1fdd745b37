"""Perplexity of each recipe with its LM head kept float (the preset) and with the int8 head that
generation gives it (``qcompiler.compile(..., lm_head="int8")``), on the first --tokens tokens of
WikiText-2 test, in one process (README, "Generating text").

    python examples/lm_head_perplexity.py --tokens 20480 --recipes w8a8-dynamic w4a16-rtn
"""

import argparse
import json

from qcompiler.config import PRESETS, BackendOptions, with_int8_lm_head
from qcompiler.tools import evaluate, models


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=20480)
    parser.add_argument("--recipes", nargs="+", default=["w8a8-dynamic", "w4a16-rtn"])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    loaded = models.load_model(args.model)
    cfg = evaluate.EvalConfig(tokens=args.tokens, window=512, speed=False)
    rows = {}
    for name in args.recipes:
        for label, recipe in ((f"{name} (LM head float)", PRESETS[name]),
                              (f"{name} (LM head int8)", with_int8_lm_head(PRESETS[name]))):
            result = evaluate.evaluate(loaded, BackendOptions(recipe=recipe), models.default_text(), cfg)
            rows.setdefault("float", result.float["perplexity"])
            rows[label] = {"perplexity": result.quantized["perplexity"], "kl": result.quantized["kl"]}
            print(f"{label:<34} perplexity {rows[label]['perplexity']:.3f}  KL {rows[label]['kl']:.4f}", flush=True)
    print(f"{'float':<34} perplexity {rows['float']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
