"""A decode GEMV of this checkout against the one of an earlier git revision, in one process.

Builds ``lowering/kernels/cpu_gemv.cpp`` as it was at ``--before`` (its ops renamed into a namespace of their
own) beside this checkout's, gives both the same random weights, says whether both give the same outputs bit
for bit, and times one decode step's worth of SmolLM2's GEMVs (30 blocks of q/k/v stacked, o, gate/up stacked
and down: 120 calls on distinct weights, so they stream from memory as in a real step), the two revisions in
turn, medians. ``--op int4`` (default): ``int4_gemv_tiled`` (w4a16; 53 MB of 4-bit codes plus their float32
scales and zeros, packed by each revision's ``reference.pack_int4_tiled``); ``--op int8``: ``int8_gemv``
(w8a8-dynamic's uint8 activations with a zero point x int8 weights, 106 MB); ``--op lm-head``:
``int8_weight_gemv`` on SmolLM2's LM head (49152 x 576, int8 per channel, float activations: the head of every
recipe by default), four distinct copies per round (113 MB) so that each streams from memory as in a real step.

    PYTHONPATH=. python examples/bench_gemv_revisions.py --before 495318b
    PYTHONPATH=. python examples/bench_gemv_revisions.py --before bf08b4a --op int8
    PYTHONPATH=. python examples/bench_gemv_revisions.py --before HEAD~1 --op lm-head
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
    """The GEMV ops (``torch.ops.qcompiler_before``) and the ``reference`` module of revision ``rev``."""
    ops = native.build_renamed(_at_revision(rev, "lowering/kernels/cpu_gemv.cpp"), "qcompiler_before", folder)
    module = types.ModuleType("reference_before")
    exec(compile(_at_revision(rev, "lowering/kernels/reference.py"), "reference_before", "exec"), module.__dict__)
    return ops, module


def _int4_calls(old_ops, old_reference, gen) -> tuple[list, list]:
    """Each revision's (op, args) for SmolLM2's 120 w4a16 decode GEMVs."""
    before, now = [], []
    for _ in range(30):
        for n, k, group in SHAPES:
            q = torch.randint(0, 16, (n, k), generator=gen)
            scale = torch.rand(n, k // group, generator=gen) * 0.01
            zero = torch.randint(0, 16, (n, k // group), generator=gen).float()
            x = torch.randn(1, k, generator=gen)
            before.append((old_ops.int4_gemv_tiled, (x, *old_reference.pack_int4_tiled(q, scale, zero), group)))
            now.append((torch.ops.qcompiler.int4_gemv_tiled, (x, *reference.pack_int4_tiled(q, scale, zero), group)))
    return before, now


def _int8_calls(old_ops, old_reference, gen) -> tuple[list, list]:
    """Each revision's (op, args) for SmolLM2's 120 w8a8-dynamic decode GEMVs (one weight layout in both)."""
    before, now = [], []
    for _ in range(30):
        for n, k, _group in SHAPES:
            w = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
            x = torch.randint(0, 256, (1, k), generator=gen, dtype=torch.uint8)
            zero_point = int(torch.randint(0, 256, (), generator=gen))
            call = (x, zero_point, w, w.sum(1, dtype=torch.int32), torch.rand(n, generator=gen) * 0.01)
            before.append((old_ops.int8_gemv, call))
            now.append((torch.ops.qcompiler.int8_gemv, call))
    return before, now


def _lm_head_calls(old_ops, old_reference, gen) -> tuple[list, list]:
    """Each revision's (op, args) for four copies of SmolLM2's int8 LM head."""
    before, now = [], []
    for _ in range(4):
        call = (torch.randn(1, 576, generator=gen), torch.randint(-127, 128, (49152, 576), generator=gen,
                                                                  dtype=torch.int8),
                torch.rand(49152, generator=gen) * 0.01)
        before.append((old_ops.int8_weight_gemv, call))
        now.append((torch.ops.qcompiler.int8_weight_gemv, call))
    return before, now


CALLS = {"int4": (_int4_calls, "SmolLM2's 120 decode GEMVs (w4a16, tiled)"),
         "int8": (_int8_calls, "SmolLM2's 120 decode GEMVs (w8a8-dynamic)"),
         "lm-head": (_lm_head_calls, "four copies of SmolLM2's int8 LM head")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="git revision whose kernel to compare against")
    parser.add_argument("--op", choices=tuple(CALLS), default="int4", help="which decode GEMV (default int4)")
    parser.add_argument("--repeats", type=int, default=31)
    args = parser.parse_args(argv)
    if native.unavailable_reason() is not None:
        raise SystemExit(native.unavailable_reason())
    with tempfile.TemporaryDirectory() as tmp:
        old_ops, old_reference = _old_kernels(args.before, Path(tmp))
        make, what = CALLS[args.op]
        before, now = make(old_ops, old_reference, torch.Generator().manual_seed(0))
        same = sum(torch.equal(op0(*a0), op1(*a1)) for (op0, a0), (op1, a1) in zip(before, now, strict=True))
        calls = {args.before: before, "this checkout": now}
        times = {name: [] for name in calls}
        for r in range(args.repeats + 1):
            for name, step in calls.items():
                start = time.perf_counter()
                for op, call in step:
                    op(*call)
                if r:  # the first round warms up
                    times[name].append(time.perf_counter() - start)
    print(f"{machine_name()}, {torch.get_num_threads()} threads: {what}, median of {args.repeats}; outputs equal "
          f"bit for bit in {same} of {len(now)}")
    base = statistics.median(times[args.before])
    for name, t in times.items():
        print(f"  {name:<16} {1e3 * statistics.median(t):7.3f} ms  ({statistics.median(t) / base:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
