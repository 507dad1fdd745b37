"""The decode step's int4 GEMV on its two weight layouts: rows (``qcompiler::int4_gemv``) against tiles of 32
output channels (``qcompiler::int4_gemv_tiled``, what AVX-512 and AVX2 builds take), in one process, interleaved, medians.

First the kernels alone on SmolLM2's decode shapes (one row of activations; q/k/v and gate/up stacked as
``fuse_gemv`` stacks them), then whole decode steps of ``w4a16-rtn`` through ``qcompiler.compile(...).generate()``:
one model compiled with the row layout (the lowering told the build has no AVX-512, as it decides on other CPUs),
one with the tiled layout, both timed in turn (``--decode`` tokens after a ``--depth``-token prompt, minus a
one-token generate).

    PYTHONPATH=. python examples/bench_int4_decode.py --json int4_decode.json
"""

import argparse
import json
import statistics
import sys
import time
from unittest import mock

import torch

import qcompiler
from qcompiler.lowering.kernels import native, reference
from qcompiler.tools import models
from qcompiler.tools.timing import machine_name, time_interleaved

# SmolLM2-135M's decode GEMVs: q/k/v stacked, o, gate/up stacked, down (N, K, group of the w4a16 presets)
SHAPES = ((960, 576, 64), (576, 576, 64), (3072, 576, 64), (576, 1536, 128))


def kernels(repeats: int) -> dict:
    out = {}
    gen = torch.Generator().manual_seed(0)
    for n, k, group in SHAPES:
        x = torch.randn(1, k, generator=gen)
        q = torch.randint(0, 16, (n, k), generator=gen)
        scale, zero = torch.rand(n, k // group, generator=gen) * 0.01, torch.full((n, k // group), 8.0)
        rows = reference.pack_int4(q)
        tiled = reference.pack_int4_tiled(q, scale, zero)
        torch.testing.assert_close(torch.ops.qcompiler.int4_gemv_tiled(x, *tiled, group),
                                   torch.ops.qcompiler.int4_gemv(x, rows, scale, zero, group), rtol=1e-5, atol=1e-5)
        medians = time_interleaved({"rows": lambda: torch.ops.qcompiler.int4_gemv(x, rows, scale, zero, group),
                                    "tiled": lambda: torch.ops.qcompiler.int4_gemv_tiled(x, *tiled, group)},
                                   repeats, warmup=20)
        out[f"{n}x{k} g{group}"] = {name: 1e6 * t for name, t in medians.items()}
    return out


def decode_steps(depth: int, decode: int, repeats: int) -> dict:
    loaded = models.load_model("smollm2-135m")
    ids = torch.randint(10, loaded.model.config.vocab_size, (1, depth), generator=torch.Generator().manual_seed(0))

    def generate(model, n):
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None)
        return time.perf_counter() - start

    compiled = {}
    for layout in ("rows", "tiled"):
        compiled[layout] = qcompiler.compile(loaded.model, "w4a16-rtn", max_cache_len=depth + decode + 2)
        isa = (lambda: "generic") if layout == "rows" else native.isa
        with mock.patch.object(native, "isa", isa):  # the graphs are lowered at their first call
            generate(compiled[layout], 3)
        kernels_used = {kernel for kernel, _ in qcompiler.last_report().kernel_of.values()}
        assert any("int4 GEMV" in k for k in kernels_used), kernels_used
    times = {layout: [] for layout in compiled}
    for _ in range(repeats):
        for layout, model in compiled.items():
            times[layout].append(1e3 * (generate(model, decode + 1) - generate(model, 1)) / decode)
    return {layout: statistics.median(t) for layout, t in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=300, help="kernel timing repeats (median reported)")
    parser.add_argument("--steps-repeats", type=int, default=9, help="decode timing repeats (median reported)")
    parser.add_argument("--depth", type=int, default=128)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--json", dest="json_out")
    args = parser.parse_args(argv)
    why = native.unavailable_reason()
    if why is not None:
        raise SystemExit(why)
    if native.isa() == "generic":
        raise SystemExit("this build's kernels are 'generic': the tiled layout is for AVX-512 and AVX2 CPUs")
    result = {"cpu": machine_name(), "threads": torch.get_num_threads(), "kernels_us": kernels(args.repeats)}
    print(f"{result['cpu']}, {result['threads']} threads; one row of activations, median of {args.repeats}")
    for shape, t in result["kernels_us"].items():
        print(f"  {shape:<16} rows {t['rows']:7.1f} us  tiled {t['tiled']:7.1f} us  ({t['rows'] / t['tiled']:.2f}x)")
    result["decode_ms_per_step"] = decode_steps(args.depth, args.decode, args.steps_repeats)
    steps = result["decode_ms_per_step"]
    print(f"w4a16-rtn decode step at depth {args.depth}, median of {args.steps_repeats}: rows {steps['rows']:.2f} ms, "
          f"tiled {steps['tiled']:.2f} ms ({steps['rows'] / steps['tiled']:.2f}x)")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
