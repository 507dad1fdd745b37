"""The ``torch.compile`` backend: ``torch.compile(model, backend="qcompiler", options={...})``.

Dynamo hands us one FX graph per captured region with the model's parameters lifted into
placeholders. We resolve the options (load the statistics and artifact folders they name), bind the
placeholders to their tensors and names, run the pass pipeline (which attaches the quantized weights as
buffers), and give the result to Inductor.

The compiled graph holds quantized copies of the weights, so it is valid only for the parameters it was
quantized from. Dynamo's guards check a lifted parameter's shape and dtype, not which tensor it is, so
it hands a graph compiled for one model to a second model of the same class and shapes compiled with
equal options (``qcompiler.compile`` gives each call a backend of its own, so it never does): that
model would run the first one's quantized weights beside its own norms and embeddings. The compiled
function therefore checks, per call, that each parameter is the tensor it was quantized from and
unchanged in place (its version counter); if not, it raises an error that says to compile again
(``torch._dynamo.reset()`` first), never a silently wrong result.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass

import torch
import torch.fx as fx

from qcompiler import dump, pipeline, report
from qcompiler.artifact import Artifact
from qcompiler.calibration.stats import CalibrationStats, resolve_stats
from qcompiler.config import BackendOptions, Recipe, needs_stats_message
from qcompiler.core import capture
from qcompiler.core.errors import ConfigError, ConfigTypeError, QCompilerError


@dataclass(frozen=True, eq=False)
class Resolved:
    """:class:`~qcompiler.config.BackendOptions` with the folders they name loaded and verified."""

    recipe: Recipe
    kernels: str
    stats: CalibrationStats | None
    artifact: Artifact | None
    debug: object
    other_weights: bool = False
    compiler: str = "inductor"


def resolve(options: BackendOptions) -> Resolved:
    """Load the statistics or artifact folder the options name (an artifact brings its own recipe and
    statistics); raise if the recipe needs statistics and none are given."""
    recipe, stats, artifact = options.recipe, resolve_stats(options.stats), options.artifact
    if artifact is not None:
        if not isinstance(artifact, Artifact):
            if not isinstance(artifact, (str, os.PathLike)):
                raise ConfigTypeError(f"option 'artifact' must be a folder path, got {type(artifact).__name__}")
            artifact = Artifact(artifact)
        recipe, stats = artifact.recipe, artifact.stats
    if recipe.needs_calibration and stats is None:
        raise ConfigError(needs_stats_message(recipe))
    return Resolved(recipe, options.kernels, stats, artifact, options.debug, options.other_weights, options.compiler)


def check_made_from(opts: Resolved, named_tensors) -> None:
    """Raise unless the statistics and artifact of ``opts`` were made from these float weights (a
    :class:`StatsError` or :class:`ArtifactError` naming them); ``opts.other_weights`` skips the check.
    Everything that quantizes with statistics or an artifact calls it before any work."""
    if opts.other_weights:
        return
    named_tensors = list(named_tensors)
    for made_from in (opts.artifact, opts.stats):
        if made_from is not None:
            made_from.check_weights(named_tensors)


def _weights_device(bound) -> torch.device:
    for info in bound.values():
        if info.tensor.is_floating_point():
            return info.tensor.device
    return torch.device("cpu")


def _check_inference(example_inputs) -> None:
    if not torch.is_grad_enabled():
        return
    if any(isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs):
        raise QCompilerError(
            "qcompiler compiles models for inference, and gradients are enabled: call the compiled "
            "model under `with torch.inference_mode():` (or torch.no_grad())."
        )


def qcompiler_backend(gm: fx.GraphModule, example_inputs, options=None, mode=None):
    """Dynamo backend entry point (registered as ``qcompiler`` through the ``torch_dynamo_backends`` entry point)."""
    if mode is not None:
        raise QCompilerError(f"qcompiler does not take mode={mode!r}; configure it with options={{...}}")
    opts = resolve(BackendOptions.from_user(options))
    _check_inference(example_inputs)
    bound = capture.bind_parameters(gm, example_inputs)
    gm = quantize_graph(gm, example_inputs, opts, bound)
    module = fx.GraphModule(gm, gm.graph)
    if opts.compiler == "eager":  # the quantized graph op by op (BackendOptions.compiler)
        return _for_these_weights(module.forward, example_inputs, bound)
    return _for_these_weights(compile_with_inductor(module, example_inputs), example_inputs, bound)


def compile_with_inductor(module: fx.GraphModule, example_inputs):
    """The quantized graph compiled by Inductor (``compiler="inductor"``, the default)."""
    from torch._inductor import config
    from torch._inductor.compile_fx import compile_fx

    from qcompiler.lowering.kernels import direct_calls

    patches = dict(INDUCTOR_CONFIG)
    if config.post_grad_custom_post_pass is None:  # (a user's own pass stays; their cache key is theirs)
        patches["post_grad_custom_post_pass"] = direct_calls.CACHE_KEY
    return compile_fx(module, example_inputs, config_patches=patches)


# Inductor's wrapper checks every input's and kernel output's size and stride on each call (some 1,000
# Python calls in a SmolLM2 decode step, 0.5 of 11.7 ms on a Zen 4). Dynamo's guards check the inputs'
# shapes already, and the fake implementations of our kernels are tested against the real ones.
INDUCTOR_CONFIG = {"size_asserts": False, "alignment_asserts": False}


def _for_these_weights(compiled, example_inputs, bound):
    """``compiled``, refusing to run on parameters other than (or changed in place since) those it was
    quantized from. The check is a few C-level passes over the parameters; the loop that names the
    culprit runs only when it fails. It still costs about 0.3 ms per SmolLM2 decode step (272 parameters,
    cold in the CPU's caches after a step's weight stream), so ``run.unchecked`` is the graph without it."""
    import operator
    import weakref

    index = {id(t): i for i, t in enumerate(example_inputs) if isinstance(t, torch.Tensor)}
    expected = []
    for info in bound.values():
        if info.is_parameter and id(info.tensor) in index:
            version = None if info.tensor.is_inference() else info.tensor._version
            expected.append((index[id(info.tensor)], weakref.ref(info.tensor), version, info.name))
    if not expected:
        return compiled
    pick = operator.itemgetter(*(i for i, *_ in expected))
    refs = [ref for _, ref, _, _ in expected]
    tracked = [n for n, (_, _, version, _) in enumerate(expected) if version is not None]
    versions = [expected[n][2] for n in tracked]

    def complain(args):
        for i, ref, version, name in expected:
            tensor = args[i]
            if ref() is not tensor:
                raise QCompilerError(
                    f"this quantized graph was compiled for another model's {name}: torch.compile reuses a "
                    "graph for every model of the same class and shapes compiled with equal options, and this "
                    "one holds the first model's quantized weights. Call torch._dynamo.reset() before compiling "
                    "this model, or compile each model with qcompiler.compile(model, recipe)")
            if version is not None and tensor._version != version:
                raise QCompilerError(
                    f"{name} was changed in place after the model was quantized (the compiled model holds "
                    "quantized copies of the weights it was compiled with): call torch._dynamo.reset() and "
                    "compile the model again")

    def run(*args):  # Dynamo calls a backend's result with the graph's inputs as positional arguments
        given = pick(args) if len(expected) > 1 else (pick(args),)
        if not all(map(operator.is_, given, [ref() for ref in refs])) or \
                [given[n]._version for n in tracked] != versions:
            complain(args)
        return compiled(*args)

    run.unchecked = compiled  # for callers that hold these very tensors and checked them once (tools/replay.py)
    return run


def quantize_graph(gm: fx.GraphModule, example_inputs, opts: Resolved, bound: dict) -> fx.GraphModule:
    """Run the pipeline on one captured graph and record its report; a bug of ours leaves it in float.
    ``bound``: what :func:`~qcompiler.core.capture.bind_parameters` returned for ``gm``."""
    start = time.perf_counter()
    check_made_from(opts, [(info.name, info.tensor) for info in bound.values()])
    device = _weights_device(bound)
    rep = report.CompileReport(graph_index=report.next_index(), recipe=opts.recipe.name, kernels=opts.kernels)
    steps = pipeline.build(opts.recipe, device, stats=opts.stats, artifact=opts.artifact, kernels=opts.kernels)
    float_graph = dump.copy_graph(gm.graph)
    folder = dump.dump_dir(opts.debug)
    dumper = None
    if folder is not None:  # the dumps run the graph eagerly: sizes as ints
        dumper = dump.Dumper(folder, rep.graph_index, gm, capture.concrete_inputs(example_inputs))
    try:
        gm = pipeline.run(gm, steps, rep, dumper)
    except pipeline.PassFailed as exc:
        # A bug of ours must not take the user's model down: run this graph in float, loudly.
        rep.error = str(exc)
        warnings.warn(f"{exc}. This graph runs in float; see qcompiler.last_report().", stacklevel=3)
        gm = fx.GraphModule(gm, float_graph)
    rep.seconds = time.perf_counter() - start
    report.record(rep)
    return gm
