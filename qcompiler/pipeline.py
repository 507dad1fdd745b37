"""The ordered passes of the backend, the constraints between them, and their timing.

Order (each pass requires the ones before it):

1. ``canonicalize``  every linear-like op on a parameter -> ``linear(x, W, b)`` (function-preserving)
2. ``insert_qdq``    quantize/dequantize per the recipe; weights become buffers
3. ``lower``         QDQ patterns -> ``qcompiler::`` integer kernels (skipped with ``kernels="reference"``)

A pass that raises is named, with the passes that ran before it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch.fx as fx

from qcompiler.config import BackendOptions
from qcompiler.errors import QCompilerError
from qcompiler.ir import PassResult
from qcompiler.lowering import fuse, ops
from qcompiler.passes.canonicalize import canonicalize
from qcompiler.passes.insert_qdq import insert_qdq
from qcompiler.report import CompileReport, PassRecord


class PassFailed(RuntimeError):
    pass


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable[[fx.GraphModule], PassResult]
    requires: tuple[str, ...] = ()


def build(options: BackendOptions, device) -> list[Step]:
    steps = [
        Step("canonicalize", canonicalize),
        Step(
            "insert_qdq",
            lambda gm: insert_qdq(gm, options.recipe, int8_pair_limit=ops.int8_pair_limit(device),
                               stats=options.stats),
            requires=("canonicalize",),
        ),
    ]
    if options.kernels == "fast":
        steps.append(Step("lower", fuse.lower, requires=("insert_qdq",)))
    check_order(steps)
    return steps


def check_order(steps: list[Step]) -> None:
    seen: list[str] = []
    for step in steps:
        missing = [r for r in step.requires if r not in seen]
        if missing:
            raise ValueError(f"pass {step.name!r} must run after {missing}; order given: {[s.name for s in steps]}")
        seen.append(step.name)


def run(gm: fx.GraphModule, steps: list[Step], report: CompileReport) -> fx.GraphModule:
    done: list[str] = []
    for step in steps:
        start = time.perf_counter()
        try:
            result = step.run(gm)
        except QCompilerError:
            raise  # the user's to fix: the message says how
        except Exception as exc:
            raise PassFailed(
                f"qcompiler pass {step.name!r} failed after {done or 'no passes'}: {type(exc).__name__}: {exc}"
            ) from exc
        gm = result.graph_module
        report.passes.append(PassRecord(step.name, time.perf_counter() - start, result.modified, dict(result.counts)))
        if step.name == "insert_qdq":
            report.layers.extend(result.details)
        if step.name == "lower":
            report.kernel_of.update({module: (kernel, why) for module, kernel, why in result.details})
        done.append(step.name)
    return gm
