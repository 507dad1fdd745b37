"""Where a decode step of ``qcompiler.compile(model, recipe).generate()`` spends its time.

Generates ``--new`` tokens greedily after a ``--depth``-token random context on a static cache of
``--cache`` positions (the cache ``qcompiler bench generate`` uses for its defaults: 514), under
torch.profiler, and splits the time of the decode steps into: the integer GEMV kernels of the linear
layers, the LM head, attention, the rest of the compiled graph (Inductor's fused C++ kernels and the
Python wrapper that calls them), Dynamo's frame entry (guards and cache lookup), and what is outside the
compiled forward (Hugging Face's generation loop). Also the step time without the profiler (median of
``--repeats``, the difference of a 1-token and a (new+1)-token generate, so the prompt cancels out).

    python examples/profile_decode.py --model smollm2-135m --recipe w8a8-dynamic [--json out.json]
"""

import argparse
import json
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

import qcompiler
from qcompiler.tools import models
from qcompiler.tools.timing import machine_name

# the kernels of fixed-shape (decode) graphs' linear layers
DECODE_LINEAR_OPS = ("qcompiler::int8_gemv", "qcompiler::int4_gemv", "qcompiler::int4_gemv_tiled")


def _step_ms(model, ctx, new: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.generate(ctx, max_new_tokens=1, eos_token_id=None, do_sample=False)
        t1 = time.perf_counter()
        model.generate(ctx, max_new_tokens=new + 1, eos_token_id=None, do_sample=False)
        t2 = time.perf_counter()
        times.append(((t2 - t1) - (t1 - t0)) / new * 1e3)
    return statistics.median(times)


def _parts(model, ctx, new_tokens: int) -> dict[str, float]:
    """Self CPU ms of one generate() of ``new_tokens`` tokens, by part."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model.generate(ctx, max_new_tokens=new_tokens, eos_token_id=None, do_sample=False)
    parts = dict.fromkeys(("linear layers", "LM head", "attention", "rest of the compiled graph",
                           "Dynamo frame entry", "outside the compiled forward (generation loop)"), 0.0)
    for e in prof.key_averages():
        ms = e.self_cpu_time_total / 1e3
        if e.key in DECODE_LINEAR_OPS:
            parts["linear layers"] += ms
        elif e.key == "qcompiler::int8_weight_gemv":  # the int8 LM head (lm_head="int8", the default)
            parts["LM head"] += ms
        elif "scaled_dot_product" in e.key or e.key == "qcompiler::decode_attention":
            parts["attention"] += ms
        elif e.key.startswith("## Call CompiledFxGraph"):  # Inductor's fused kernels and their Python wrapper
            parts["rest of the compiled graph"] += ms
        elif e.key in ("TorchDynamo Cache Lookup", "Pregraph bytecode", "AOTDispatcher Runtime Wrapper Prologue") \
                or e.key.startswith("Torch-Compiled Region"):
            parts["Dynamo frame entry"] += ms
        else:
            parts["outside the compiled forward (generation loop)"] += ms
    return parts


def _breakdown(model, ctx, new: int) -> dict[str, float]:
    """Self CPU ms per decode step, by part: a generate() of new+1 tokens less one of 1 token (the prompt)."""
    steps, prompt = _parts(model, ctx, new + 1), _parts(model, ctx, 1)
    return {name: (steps[name] - prompt[name]) / new for name in steps}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--recipe", default="w8a8-dynamic")
    parser.add_argument("--depth", type=int, default=128)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--cache", type=int, default=514)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", dest="json_out")
    args = parser.parse_args(argv)

    loaded = models.load_model(args.model)
    model = qcompiler.compile(loaded.model, args.recipe, max_cache_len=args.cache)
    vocab = loaded.model.config.vocab_size
    ctx = torch.randint(10, vocab, (1, args.depth), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model.generate(ctx, max_new_tokens=4, eos_token_id=None, do_sample=False)  # compiles both graphs
        step = _step_ms(model, ctx, args.new, args.repeats)
        parts = _breakdown(model, ctx, args.new)
    result = {"model": args.model, "recipe": args.recipe, "machine": machine_name(), "threads": torch.get_num_threads(),
              "depth": args.depth, "cache": args.cache, "step_ms": step, "profiled_ms_per_step": parts}
    print(f"{args.model} {args.recipe} on {result['machine']}, {result['threads']} threads: decode step "
          f"{step:.2f} ms ({1e3 / step:.1f} tokens/s) at depth {args.depth}, cache {args.cache}")
    for name, ms in parts.items():
        print(f"  {name:<48} {ms:6.2f} ms")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
