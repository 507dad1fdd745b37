"""The ordered passes of the backend, the constraints between them, and their timing.

Order (a pass runs only if the recipe asks for it; each requires the ones named in ``requires``):

1. ``canonicalize``    every linear-like op on a parameter -> ``linear(x, W, b)`` (function-preserving)
2. ``plan``            per layer: the fitted scheme, the kernel and why, or why float (``qcompiler/plan.py``)
   ``rotate``          the residual stream rotated (``Recipe(rotation=Rotation())``; data-free, function-
   preserving: ``passes/rotate.py``)
3. ``attach_stats``    calibrated input channel ranges onto the linears (when transforms need them)
4. ``smoothquant``     SmoothQuant migration (function-preserving)
5. ``split_outliers``  outlier channel splitting (function-preserving)
6. ``mixed_int8``      LLM.int8() decomposition: outlier columns to a float linear (function-preserving)
7. ``fold_awq``        ``AWQ(foldable=True)``'s shared input scales folded into norms and producers' rows
   (``passes/weight_rounding/fold.py``; function-preserving up to float rounding)
8. ``insert_qdq``      quantize/dequantize per the plan; weights become buffers
   ``quantize_embeddings`` the embedding tables, weight-only (``Recipe(embedding=...)``:
   ``passes/quantize_embeddings.py``)
9. ``load_artifact``   an artifact's saved tensors replace the computed ones (with ``artifact=``)
10. ``lower``          QDQ patterns -> ``qcompiler::`` integer kernels (skipped with ``kernels="reference"``)
11. ``fuse_gemv``      decode-step GEMVs that read the same input (q/k/v, gate/up) -> one call on stacked
    weights (exact; ``qcompiler/lowering/fuse_gemv.py``)
12. ``gqa_attention``  grouped-query attention reads the KV cache without repeating it (exact)
13. ``decode_attention`` one-query attention (decode steps) reads only the filled part of a static KV cache
    (``qcompiler/lowering/attention.py``; CPU, skipped with ``kernels="reference"``)
14. ``online_hadamard`` a rotated model's online Hadamard transforms on few rows -> one C++ call each
    (``qcompiler/lowering/hadamard.py``; CPU, with ``rotation``, skipped with ``kernels="reference"``)

Calibration runs 1-6 (with ``rotate``) and then inserts observers, so static ranges are those of the transformed
inputs. A pass that raises is named, with the passes that ran before it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.fx as fx

from qcompiler.config import AWQ, Recipe
from qcompiler.core.errors import QCompilerError, StatsError
from qcompiler.core.ir import PLAN, PassResult
from qcompiler.lowering import attention, fuse, fuse_gemv, hadamard
from qcompiler.passes.attach_stats import attach_stats
from qcompiler.passes.canonicalize import canonicalize
from qcompiler.passes.gqa_attention import gqa_attention
from qcompiler.passes.insert_qdq import insert_qdq
from qcompiler.passes.mixed_int8 import mixed_int8
from qcompiler.passes.quantize_embeddings import quantize_embeddings
from qcompiler.passes.rotate import rotate
from qcompiler.passes.smoothquant import smoothquant
from qcompiler.passes.split_outliers import split_outliers
from qcompiler.passes.weight_rounding.fold import fold_awq_scales
from qcompiler.plan import make_plan
from qcompiler.report import CompileReport, PassRecord

ORDER = ("canonicalize", "plan", "rotate", "attach_stats", "smoothquant", "split_outliers", "mixed_int8", "fold_awq",
         "insert_qdq", "quantize_embeddings", "load_artifact", "lower", "fuse_gemv", "gqa_attention", "decode_attention",
         "online_hadamard")


class PassFailed(RuntimeError):
    pass


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable[[fx.GraphModule], PassResult]
    requires: tuple[str, ...] = ()


def base_steps(recipe: Recipe, device: torch.device | None = None, kernels: str = "fast") -> list[Step]:
    """canonicalize, the plan and the data-free rotation: what every statistic is gathered after."""
    steps = [Step("canonicalize", canonicalize),
             Step("plan", lambda gm: make_plan(gm, recipe, device, kernels), requires=("canonicalize",))]
    if recipe.rotation is not None:
        steps.append(Step("rotate", lambda gm: rotate(gm, recipe.rotation), requires=("plan",)))
    return steps


def transform_steps(recipe: Recipe, raw: Mapping | None, device: torch.device | None = None,
                    kernels: str = "fast") -> list[Step]:
    """The base steps and the recipe's function-preserving transforms (shared with calibration).
    ``raw``: the float model's calibration statistics by module (what the transforms are computed from)."""
    steps = base_steps(recipe, device, kernels)
    if not recipe.transforms:
        return steps
    if raw is not None:
        steps.append(Step("attach_stats", lambda gm: attach_stats(gm, raw), requires=("plan",)))
    if recipe.smoothquant is not None:
        steps.append(Step("smoothquant", lambda gm: smoothquant(gm, recipe.smoothquant),
                          requires=("plan", "attach_stats")))
    if recipe.split_outliers is not None:
        needs = ("attach_stats",) if recipe.split_outliers.mode == "activation" else ()
        steps.append(Step("split_outliers", lambda gm: split_outliers(gm, recipe.split_outliers),
                          requires=("plan",) + needs))
    if recipe.mixed_int8 is not None:
        steps.append(Step("mixed_int8", lambda gm: mixed_int8(gm, recipe.mixed_int8),
                          requires=("plan", "attach_stats")))
    return steps


def static_ranges(recipe: Recipe, stats) -> Mapping | None:
    """The statistics static activation ranges are read from: those of the transformed inputs."""
    if stats is None:
        return None
    if not recipe.transforms:
        return stats.raw
    if stats.info.get("transforms") == recipe.transform_fingerprint():
        return stats.activations
    if not recipe.has_static_activations:
        return None
    raise StatsError(
        f"recipe {recipe.name!r} quantizes the inputs of its transforms ({', '.join(type(t).__name__ for t in recipe.transforms)}) "
        "with static ranges, but these statistics were not gathered with the same transforms: calibrate with "
        "this recipe (qcompiler.calibrate(model, batches, recipe))"
    )


def check_rotation(recipe: Recipe, stats) -> None:
    """Statistics are of the rotated model exactly when the recipe rotates (with the same rotation)."""
    if stats is None:
        return
    theirs = stats.info.get("rotation", repr(None))
    if theirs != repr(recipe.rotation):
        raise StatsError(f"these statistics were gathered with rotation {theirs}, and recipe {recipe.name!r} has "
                         f"{recipe.rotation!r}: calibrate with this recipe (qcompiler.calibrate(model, batches, "
                         "recipe))")


def rounded_weights(recipe: Recipe, stats):
    """GPTQ/AWQ weights from the statistics, checked to be for this recipe's rounding and schemes."""
    if not recipe.data_driven_rounding:
        return None
    if stats is None:
        raise StatsError(f"recipe {recipe.name!r} rounds weights on calibration data: pass "
                         "options={'stats': qcompiler.calibrate(model, batches, recipe)} (or a saved folder)")
    if stats.info.get("rounding") != recipe.rounding_fingerprint():
        raise StatsError(f"these statistics were not calibrated with recipe {recipe.name!r}'s rounding and weight "
                         f"scheme (they say {stats.info.get('rounding')!r}); calibrate with this recipe")
    return stats.weights


def build(recipe: Recipe, device: torch.device, *, stats=None, artifact=None, kernels: str = "fast") -> list[Step]:
    """The steps for one graph: ``stats`` a loaded ``CalibrationStats`` (or None), ``artifact`` a loaded
    ``qcompiler.artifact.Artifact`` whose tensors replace the computed ones (or None)."""
    check_rotation(recipe, stats)
    steps = transform_steps(recipe, None if stats is None else stats.raw, device, kernels)
    ranges = static_ranges(recipe, stats)
    rounded = rounded_weights(recipe, stats)
    if isinstance(recipe.rounding, AWQ) and recipe.rounding.foldable:
        rounded = dict(rounded)  # this graph's copy: the fold changes entries, the statistics stay as they are
        steps.append(Step("fold_awq", lambda gm: fold_awq_scales(gm, rounded), requires=("plan",)))
    steps.append(Step(
        "insert_qdq",
        lambda gm: insert_qdq(gm, recipe.rounding, recipe.name, ranges=ranges, rounded=rounded),
        requires=("plan",),
    ))
    if recipe.embedding is not None:
        # a table shares a tied head's integers only when they are the table's own rounding (nearest, HQQ):
        # GPTQ/AWQ move them to fit the head's inputs, not the lookups
        share = not recipe.data_driven_rounding
        steps.append(Step("quantize_embeddings", lambda gm: quantize_embeddings(gm, recipe.embedding, share=share)))
    if artifact is not None:
        steps.append(Step("load_artifact", artifact.apply, requires=("insert_qdq",)))
    if kernels == "fast":
        steps.append(Step("lower", fuse.lower, requires=("insert_qdq",)))
        steps.append(Step("fuse_gemv", fuse_gemv.fuse_gemv, requires=("lower",)))
    steps.append(Step("gqa_attention", gqa_attention))
    if kernels == "fast" and device.type == "cpu":
        steps.append(Step("decode_attention", attention.decode_attention, requires=("gqa_attention",)))
        if recipe.rotation is not None:
            steps.append(Step("online_hadamard", hadamard.online_hadamard, requires=("rotate",)))
    check_order(steps)
    return steps


def check_order(steps: list[Step]) -> None:
    seen: list[str] = []
    for step in steps:
        missing = [r for r in step.requires if r not in seen]
        if missing:
            raise ValueError(f"pass {step.name!r} must run after {missing}; order given: {[s.name for s in steps]}")
        if step.name in ORDER and any(ORDER.index(step.name) < ORDER.index(p) for p in seen if p in ORDER):
            raise ValueError(f"pass {step.name!r} is out of order: the order is {ORDER}; given {[s.name for s in steps]}")
        seen.append(step.name)


def run(gm: fx.GraphModule, steps: list[Step], report: CompileReport, dumper=None) -> fx.GraphModule:
    """Run ``steps`` in order; ``dumper`` (``qcompiler.dump.Dumper``) records each pass when debugging."""
    done: list[str] = []
    for step in steps:
        if dumper is not None:
            dumper.before(gm)
        start = time.perf_counter()
        try:
            result = step.run(gm)
        except Exception as exc:
            if dumper is not None:
                dumper.failed(step.name, f"{type(exc).__name__}: {exc}", done)
            if isinstance(exc, QCompilerError):
                raise  # the user's to fix: the message says how
            raise PassFailed(
                f"qcompiler pass {step.name!r} failed after {done or 'no passes'}: {type(exc).__name__}: {exc}"
            ) from exc
        gm = result.graph_module
        seconds = time.perf_counter() - start
        report.passes.append(PassRecord(step.name, seconds, result.modified, dict(result.counts)))
        if dumper is not None:
            dumper.after(step.name, gm, seconds, result.modified, dict(result.counts), done)
        report.plan = gm.meta.get(PLAN, report.plan)  # set by the plan step, replaced by width-changing transforms
        if step.name in ("canonicalize", "insert_qdq", "quantize_embeddings"):
            report.layers.extend(result.details)  # canonicalize: products on parameters it could not rewrite
        elif step.name == "lower":
            repacked = {}
            for module, kernel, why, decision in result.details:
                report.kernel_of[module] = (kernel, why)
                if decision is not None:
                    repacked[module] = decision
            report.layers[:] = [repacked.get(d.module, d) if d.quantized else d for d in report.layers]
        elif result.details:
            report.transforms[step.name] = list(result.details)
        done.append(step.name)
    return gm
