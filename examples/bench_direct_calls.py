"""A decode step with the kernels called through PyTorch's dispatcher against the direct calls, in one process.

Compiles the model twice with ``qcompiler.compile``: first with Inductor's table of custom wrapper code emptied of
our ops (so the wrapper calls ``torch.ops.qcompiler.<op>.default``, as before ``direct_calls.py``), then with it
(``extern_kernels.qcompiler_<op>``); the two graphs are cached under different keys (``direct_calls.CACHE_KEY``).
Then times a decode step of each in turn, ``--rounds`` times (the difference of a 1-token and a 65-token greedy
generate after a ``--depth``-token random context, so the prompt cancels out), and prints the medians and whether
both made the same tokens.

    python examples/bench_direct_calls.py --model smollm2-135m --recipe w8a8-dynamic
"""

import argparse
import statistics
import time

import torch

import qcompiler
from qcompiler.lowering.kernels import direct_calls, native
from qcompiler.tools import models
from qcompiler.tools.timing import machine_name


def _step_ms(model, ctx, new: int):
    t0 = time.perf_counter()
    model.generate(ctx, max_new_tokens=1, eos_token_id=None, do_sample=False)
    t1 = time.perf_counter()
    out = model.generate(ctx, max_new_tokens=new + 1, eos_token_id=None, do_sample=False)
    t2 = time.perf_counter()
    return ((t2 - t1) - (t1 - t0)) / new * 1e3, out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--recipe", default="w8a8-dynamic")
    parser.add_argument("--depth", type=int, default=128)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--cache", type=int, default=514)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args(argv)
    if native.unavailable_reason() is not None:
        raise SystemExit(native.unavailable_reason())
    from torch._inductor.codegen.custom_extern_kernel_codegen import CUSTOM_EXTERN_KERNEL_CODEGEN

    hooks = {direct_calls.op_name(op): CUSTOM_EXTERN_KERNEL_CODEGEN.pop(direct_calls.op_name(op))
             for op in direct_calls.OPS}
    compiled, ctx = {}, None
    with torch.inference_mode():
        for way in ("dispatcher", "direct"):
            if way == "direct":
                CUSTOM_EXTERN_KERNEL_CODEGEN.update(hooks)
            loaded = models.load_model(args.model)
            compiled[way] = qcompiler.compile(loaded.model, args.recipe, max_cache_len=args.cache)
            if ctx is None:
                ctx = torch.randint(10, loaded.model.config.vocab_size, (1, args.depth),
                                    generator=torch.Generator().manual_seed(0))
            compiled[way].generate(ctx, max_new_tokens=4, eos_token_id=None, do_sample=False)  # compiles
        times, tokens = {way: [] for way in compiled}, {}
        for _ in range(args.rounds):
            for way, model in compiled.items():
                ms, tokens[way] = _step_ms(model, ctx, args.new)
                times[way].append(ms)
    before, after = statistics.median(times["dispatcher"]), statistics.median(times["direct"])
    print(f"{args.model} {args.recipe} on {machine_name()}, {torch.get_num_threads()} threads, decode step at depth "
          f"{args.depth} (medians of {args.rounds} rounds in turn): dispatcher {before:.2f} ms, direct calls "
          f"{after:.2f} ms ({after / before:.3f}x); same tokens: {torch.equal(tokens['dispatcher'], tokens['direct'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
