"""The tiled int4 decode GEMV of this checkout against the one of an earlier git revision, in one process.

Builds ``lowering/kernels/cpu_gemv.cpp`` as it was at ``--before`` (its ops renamed into a namespace of their
own) beside this checkout's, packs the same random 4-bit weights with each revision's
``reference.pack_int4_tiled``, says whether both give the same outputs bit for bit, and times one decode step's worth of
SmolLM2's GEMVs (30 blocks of q/k/v stacked, o, gate/up stacked and down: 120 calls on distinct weights,
53 MB of 4-bit codes plus their float32 scales and zeros, so they stream from memory as in a real step),
the two revisions in turn, medians.

    PYTHONPATH=. python examples/bench_int4_revisions.py --before 495318b
"""

import argparse
import statistics
import subprocess
import tempfile
import time
import types
from pathlib import Path

import torch

from qcompiler.lowering.kernels import native, reference
from qcompiler.tools.timing import machine_name

# SmolLM2-135M's decode GEMVs (N, K, group of the w4a16 presets), as fuse_gemv stacks them
SHAPES = ((960, 576, 64), (576, 576, 64), (3072, 576, 64), (576, 1536, 128))
ROOT = Path(__file__).resolve().parent.parent


def _at_revision(rev: str, path: str) -> str:
    return subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout


def _old_kernels(rev: str, folder: Path):
    """The ``int4_gemv_tiled`` op and ``pack_int4_tiled`` of revision ``rev``."""
    ops = native.build_renamed(_at_revision(rev, "lowering/kernels/cpu_gemv.cpp"), "qcompiler_before", folder)
    module = types.ModuleType("reference_before")
    exec(compile(_at_revision(rev, "lowering/kernels/reference.py"), "reference_before", "exec"), module.__dict__)
    return ops.int4_gemv_tiled, module.pack_int4_tiled


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="git revision whose kernel to compare against")
    parser.add_argument("--repeats", type=int, default=31)
    args = parser.parse_args(argv)
    if native.unavailable_reason() is not None:
        raise SystemExit(native.unavailable_reason())
    with tempfile.TemporaryDirectory() as tmp:
        old_op, old_pack = _old_kernels(args.before, Path(tmp))
        gen = torch.Generator().manual_seed(0)
        calls, differ = {args.before: [], "this checkout": []}, 0
        for _ in range(30):
            for n, k, group in SHAPES:
                q = torch.randint(0, 16, (n, k), generator=gen)
                scale = torch.rand(n, k // group, generator=gen) * 0.01
                zero = torch.randint(0, 16, (n, k // group), generator=gen).float()
                x = torch.randn(1, k, generator=gen)
                before, now = old_pack(q, scale, zero), reference.pack_int4_tiled(q, scale, zero)
                same = torch.equal(old_op(x, *before, group), torch.ops.qcompiler.int4_gemv_tiled(x, *now, group))
                differ += not same
                calls[args.before].append((old_op, x, before, group))
                calls["this checkout"].append((torch.ops.qcompiler.int4_gemv_tiled, x, now, group))
        times = {name: [] for name in calls}
        for r in range(args.repeats + 1):
            for name, step in calls.items():
                start = time.perf_counter()
                for op, x, weights, group in step:
                    op(x, *weights, group)
                if r:  # the first round warms up
                    times[name].append(time.perf_counter() - start)
    print(f"{machine_name()}, {torch.get_num_threads()} threads: SmolLM2's 120 decode GEMVs (w4a16, tiled), "
          f"median of {args.repeats}; outputs equal bit for bit in {120 - differ} of 120")
    base = statistics.median(times[args.before])
    for name, t in times.items():
        print(f"  {name:<16} {1e3 * statistics.median(t):7.3f} ms  ({statistics.median(t) / base:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
