"""Calibration: run batches through the model, captured as the backend captures it, with observers.

    stats = qcompiler.calibrate(model, batches, "w8a8-static")
    stats.save("stats/")
    compiled = torch.compile(model, backend="qcompiler", options={"recipe": "w8a8-static", "stats": stats})
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from qcompiler import pipeline
from qcompiler.calibration.observers import ActivationObserver
from qcompiler.calibration.stats import CalibrationStats
from qcompiler.config import Recipe, resolve_recipe
from qcompiler.core import __version__, capture, integrity
from qcompiler.core.errors import CalibrationError, ConfigError, QCompilerError
from qcompiler.core.files import read_text
from qcompiler.core.histogram import DEFAULT_BINS
from qcompiler.passes.insert_observers import insert_observers
from qcompiler.passes.weight_rounding import sequential

SAMPLE_ROWS = 128  # rows of each layer input kept for searches (SmoothQuant's alpha="auto")


def _batches(batches) -> list:
    """The batches as a list (iterated twice when the recipe has transforms), each checked for its type."""
    if isinstance(batches, (torch.Tensor, str, bytes)):
        raise CalibrationError(
            f"batches must be an iterable of batches (e.g. a list of input-id tensors), not a single "
            f"{type(batches).__name__}; wrap it in a list"
        )
    batches = list(batches)
    if not batches:
        raise CalibrationError("no calibration batches: pass a non-empty list of batches (e.g. 128 x 512 tokens)")
    try:
        return [capture.as_batch(b) for b in batches]
    except QCompilerError as exc:
        raise CalibrationError(f"calibration: {exc}") from None


def _last_logits_only(model: torch.nn.Module, recipe: Recipe, batches: list) -> list:
    """The batches with ``logits_to_keep=1`` where the model takes it (Hugging Face causal LMs) and the recipe
    keeps its output layer in float: calibration reads no logits and observes nothing after that layer's input,
    so the model computes the last position's logits only (the LM head is a fifth of SmolLM2-135M's forward).
    The observed inputs are the same values."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    name = next((n for n, m in model.named_modules() if m is head), None) if head is not None else None
    if name is None or recipe.skip_pattern_for(name) is None or not capture.accepts(model, "logits_to_keep"):
        return batches
    return [capture.with_default(b, "logits_to_keep", 1) for b in batches]


def calibrate(
    model: torch.nn.Module,
    batches: Iterable,
    recipe: str | Recipe | None = None,
    *,
    progress: bool = True,
    bins: int = DEFAULT_BINS,
    sample_rows: int | None = None,
    channel_bins: int = 0,
) -> CalibrationStats:
    """Statistics of every linear layer's input over ``batches`` (layers the recipe skips are left out).

    With transforms (SmoothQuant, outlier splitting, LLM.int8()) and static activations the batches
    run twice: once for the float inputs the transforms are computed from, once after the transforms
    for the static ranges. ``sample_rows`` rows per layer input are kept for SmoothQuant's
    ``alpha="auto"`` search (default: 128 when the recipe asks for it, else none). ``channel_bins`` > 0
    also keeps a histogram per input channel (``C x channel_bins`` counts per layer input, float64
    while calibrating and float32 once frozen: with 1024 bins about 8 KB per input channel, 1.2 GB
    live for SmolLM2-135M's 150k linear input channels; 1024 is a good size) so that ``stats[module].channel_range("percentile" | "mse" | "kl", ...)`` works;
    per-channel min/max and their moving averages are always kept.
    The model's weights and outputs are not changed. Raises :class:`CalibrationError` on no batches,
    unsupported batch types, a model without linear layers, or inf/NaN in a layer's input (named).
    """
    recipe = resolve_recipe(recipe)
    if channel_bins and (channel_bins < 2 or channel_bins & (channel_bins - 1)):
        raise ConfigError(f"channel_bins must be 0 (no per-channel histograms) or a power of two >= 2, got {channel_bins}")
    use_cache_off = capture.accepts(model, "use_cache")
    batches = [capture.as_batch(b, use_cache_off) for b in _batches(batches)]

    if sample_rows is None:
        sample_rows = SAMPLE_ROWS if recipe.smoothquant is not None and recipe.smoothquant.alpha == "auto" else 0

    start = time.perf_counter()
    if recipe.data_driven_rounding:
        return _calibrate_rounding(model, batches, recipe, bins, progress, start, channel_bins, sample_rows)
    batches = _last_logits_only(model, recipe, batches)
    raw, count, tokens = _observe(model, batches, lambda: pipeline.base_steps(recipe),
                                  bins, sample_rows, progress, "calibrating", channel_bins)
    info = {
        "batches": count, "tokens": tokens, "recipe": recipe.name, "bins": bins, "channel_bins": channel_bins,
        "transforms": repr(((), recipe.skip)), "rotation": repr(recipe.rotation), "qcompiler_version": __version__,
        "weight_fingerprints": integrity.weight_fingerprints(model.named_parameters()),
    }
    transformed = None
    if recipe.transforms and recipe.has_static_activations:
        # the static ranges must be those of the transformed inputs: observe again, after the transforms
        def steps():
            return pipeline.transform_steps(recipe, raw)

        transformed, _, _ = _observe(model, batches, steps, bins, 0, progress,
                                     "calibrating (transformed)", channel_bins)
        info["transforms"] = recipe.transform_fingerprint()
    info["seconds"] = round(time.perf_counter() - start, 2)
    if transformed is None:
        return CalibrationStats(raw, info)
    return CalibrationStats(transformed, info, raw=raw)


def _calibrate_rounding(model, batches, recipe: Recipe, bins: int, progress: bool, start: float,
                        channel_bins: int = 0, sample_rows: int = 0) -> CalibrationStats:
    """GPTQ/AWQ: round every layer's weight on the batches, layer by layer (and observe the inputs too
    when the recipe also has static activation ranges). With SmoothQuant the float inputs are observed
    first, and the smoothed weights are rounded on the smoothed inputs."""
    raw = None
    observed = _last_logits_only(model, recipe, batches)
    if recipe.transforms:  # the transforms' own statistics, from the float model
        raw, _, _ = _observe(model, observed, lambda: pipeline.base_steps(recipe), bins, sample_rows,
                             progress, "calibrating", channel_bins)
        steps = pipeline.transform_steps(recipe, raw)  # canonicalize, the plan, the transforms
    else:
        steps = pipeline.base_steps(recipe)  # canonicalize, the plan (and the rotation)

    def prepare(gm, example_inputs):
        for step in steps:
            step.run(gm)

    try:
        gm, calls = capture.capture(model, batches, prepare=prepare, what="GPTQ/AWQ calibration")
    except CalibrationError:
        raise
    except QCompilerError as exc:
        raise CalibrationError(str(exc)) from None
    weights = sequential.round_weights(gm, calls, recipe.rounding, progress)
    if not weights:
        raise CalibrationError(
            "no linear layer could be rounded (none found, all skipped by the recipe's skip list "
            f"{recipe.skip}, or none whose width is a multiple of the group size)"
        )
    activations = {}
    if recipe.has_static_activations:
        activations, _, _ = _observe(model, observed, lambda: steps, bins, 0, progress, "calibrating", channel_bins)
    info = {
        "batches": len(batches), "tokens": sum(capture.batch_tokens(b) for b in batches), "recipe": recipe.name,
        "bins": bins, "channel_bins": channel_bins, "rotation": repr(recipe.rotation),
        "transforms": repr(((), recipe.skip)),
        "rounding": recipe.rounding_fingerprint(), "qcompiler_version": __version__,
        "seconds": round(time.perf_counter() - start, 2),
        "weight_fingerprints": integrity.weight_fingerprints(model.named_parameters()),
    }
    if raw is not None and not recipe.has_static_activations:
        return CalibrationStats(raw, info, weights=weights)  # the transforms' statistics are all it needs
    if raw is not None:
        info["transforms"] = recipe.transform_fingerprint()  # the static ranges are of the smoothed inputs
    return CalibrationStats(activations, info, weights=weights, raw=raw)


def _observe(model, batches: list, steps, bins: int, sample_rows: int, progress: bool, desc: str,
             channel_bins: int = 0):
    """Run the batches through the model captured with ``steps()`` and observers on the linear inputs
    the plan quantizes."""
    observers: dict[str, ActivationObserver] = {}

    def observer_for(modules: tuple[str, ...]):
        # the layers that read one value share its observer (each gets its own frozen copy below)
        observer = observers.get(modules[0]) or ActivationObserver(", ".join(modules), bins, sample_rows=sample_rows,
                                                                   channel_bins=channel_bins)
        observers.update(dict.fromkeys(modules, observer))
        return observer.observe

    def calibration_backend(gm, example_inputs, **_):
        capture.bind_parameters(gm, example_inputs)
        for step in steps():
            step.run(gm)
        insert_observers(gm, observer_for)
        return gm.forward

    # its own recompile limit: in a process that compiled this model class before, a shared limit could
    # be reached, and Dynamo would then run the batches eagerly, past the observers
    compiled = torch.compile(model, backend=calibration_backend, isolate_recompiles=True)
    tokens = 0
    with torch.inference_mode():
        for batch in tqdm(batches, total=len(batches), desc=desc, disable=not progress):
            capture.call(compiled, batch)
            tokens += capture.batch_tokens(batch)
    seen = {m: o.freeze() for m, o in observers.items() if o.batches > 0}
    if not seen:
        raise CalibrationError(
            "the model has no linear layers to calibrate (none found, or all kept in float by the recipe: its "
            "skip list, or none it can quantize)"
        )
    return seen, len(batches), tokens


def text_batches(tokenizer, path: str | Path, samples: int, seq_len: int, add_bos: bool = False) -> list[torch.Tensor]:
    """``samples`` consecutive, non-overlapping windows of ``seq_len`` tokens from a text file, as [1, T] tensors."""
    text = read_text(path, "calibration text")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    body = seq_len - 1 if add_bos else seq_len
    need = samples * body
    if len(ids) < need:
        raise CalibrationError(
            f"{path} has {len(ids)} tokens, fewer than {samples} samples x {body} tokens; "
            "use fewer --samples, a shorter --seq-len, or a longer text"
        )
    out = []
    for i in range(samples):
        chunk = torch.tensor(ids[i * body : (i + 1) * body], dtype=torch.long)
        if add_bos:
            chunk = torch.cat([torch.tensor([tokenizer.bos_token_id]), chunk])
        out.append(chunk.unsqueeze(0))
    return out
