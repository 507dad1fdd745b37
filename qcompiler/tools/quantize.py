"""Quantize a model into an artifact folder, and compile a model from one (``qcompiler quantize`` /
``qcompiler.load``). The folder's format is ``qcompiler/artifact.py``."""

from __future__ import annotations

from pathlib import Path

import torch

from qcompiler import artifact, backend, pipeline
from qcompiler.config import BackendOptions
from qcompiler.core import capture, integrity
from qcompiler.report import CompileReport
from qcompiler.tools import compare
from qcompiler.tools.model_bits import model_bits, model_weights


def quantize(model: torch.nn.Module, recipe, batch, out, stats=None, errors: bool = True,
             other_weights: bool = False) -> Path:
    """Quantize ``model`` with ``recipe`` on one example ``batch`` and write the artifact to ``out``.
    ``errors``: also record each layer's SQNR and the logits' KL on the batch (runs the model twice more).
    ``out`` is checked before any work (absent or an empty folder) and written atomically. Statistics
    gathered on other weights are an error unless ``other_weights``."""
    artifact.check_output(out)
    opts = backend.resolve(BackendOptions(recipe=recipe, stats=stats, kernels="reference",
                                          other_weights=other_weights))
    backend.check_made_from(opts, model.named_parameters())
    example = capture.as_batch(batch, use_cache_off=capture.accepts(model, "use_cache"))
    gm, inputs = capture.capture(model, [example], what="qcompiler quantize")
    inputs = inputs[0]
    bound = capture.bind_parameters(gm, inputs)
    device = next((info.tensor.device for info in bound.values()), torch.device("cpu"))
    report = CompileReport(0, opts.recipe.name, opts.kernels)
    gm = pipeline.run(gm, pipeline.build(opts.recipe, device, stats=opts.stats, kernels=opts.kernels), report)
    comparison = compare.compare(model, opts.recipe, batch, stats=opts.stats, top=0,
                                 other_weights=other_weights) if errors else None
    counted = {"bits": model_bits(model, report.layers), "weights": model_weights(model)}
    return artifact.save(Path(out), gm, opts.recipe, opts.stats, report, comparison,
                         artifact.parameter_fingerprint(model.named_parameters()),
                         integrity.weight_fingerprints(model.named_parameters()), counted)


def load(folder, model: torch.nn.Module, other_weights: bool = False, **options):
    """``torch.compile(model, backend="qcompiler", options={"artifact": folder, ...})`` after checking
    that ``model`` is the one the artifact was made for: the same parameter names and shapes and, unless
    ``other_weights``, the same float weights."""
    verified = artifact.Artifact(folder)
    verified.check_parameters(model.named_parameters())
    if not other_weights:
        verified.check_weights(model.named_parameters())
    return torch.compile(model, backend="qcompiler",
                         options={"artifact": verified, "other_weights": other_weights, **options})
