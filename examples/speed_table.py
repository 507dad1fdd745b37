"""Size and latency of several recipes on one model, in one process, against the same fp32 model.

Each recipe is compiled with its calibration folder (if it needs one) and timed against fp32 eager
the way ``qcompiler eval`` does it (medians of interleaved repeats): a decode step (one new token on
a 128-token KV cache) and a 512-token prefill. Accuracy is ``qcompiler eval``'s job; this script is
for the size/speed columns of the README tables.

    python examples/speed_table.py --model smollm2-135m \\
        w8a8-dynamic w8a8-static=stats/static w8a8-smoothquant=stats/sq ... [--json out.json]
"""

import argparse
import json
import sys

import torch

from qcompiler import report
from qcompiler.config import BackendOptions
from qcompiler.tools import evaluate, models


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("recipes", nargs="+", help="RECIPE or RECIPE=STATS_DIR")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", dest="json_out")
    args = parser.parse_args(argv)

    loaded = models.load_model(args.model)
    cfg = evaluate.EvalConfig(speed=True, speed_repeats=args.repeats)
    float_bytes = evaluate.model_weight_bytes(loaded.model)
    rows = []
    for item in args.recipes:
        recipe, _, stats = item.partition("=")
        torch._dynamo.reset()
        report.clear_reports()
        options = BackendOptions(recipe=recipe, stats=stats or None)
        quantized = evaluate.compile_quantized(loaded.model, options)
        print(f"timing {recipe} ...", file=sys.stderr)
        with torch.inference_mode():
            speed = evaluate.measure_speed(loaded, quantized, cfg)
        layers = {d.module: d for r in report.reports() for d in r.layers}
        rows.append({
            "recipe": recipe,
            "weight_bytes": evaluate.quantized_weight_bytes(loaded.model, layers.values()),
            "decode_speedup": speed["decode_speedup"],
            "prefill_speedup": speed["prefill_speedup"],
            "speed": speed,
        })
        r = rows[-1]
        print(f"{recipe:<24} {r['weight_bytes'] / 1e6:7.1f} MB  decode {r['decode_speedup']:.2f}x  "
              f"prefill {r['prefill_speedup']:.2f}x", flush=True)
    print(f"{'fp32':<24} {float_bytes / 1e6:7.1f} MB")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"model": args.model, "float_weight_bytes": float_bytes, "threads": torch.get_num_threads(),
                       "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
