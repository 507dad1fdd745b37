"""From a model and a recipe to the engine-neutral :class:`ExportModel` the writers take.

The backend's passes run once on a captured graph with the reference kernels (the quantize/dequantize
form); each quantized linear's integers, scales and zero points are read from the graph's buffers
(the ones the plan and ``insert_qdq`` chose, so the export is what ``qcompiler eval`` measured) and
named by the Hugging Face module they replace. Everything else is the float model's state dict.

Recipes whose transforms change tensors other than the linears' weights (SmoothQuant, outlier channel
splitting, LLM.int8() decomposition, AWQ's input scales) are refused before any work: the engines have
no place for a divided input or for float columns beside an int8 GEMM, and folding the scales into the
norms is not done yet.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import torch

from qcompiler import backend, pipeline
from qcompiler.config import AWQ, BackendOptions
from qcompiler.core import capture
from qcompiler.core.errors import ExportError
from qcompiler.core.ir import QLINEAR
from qcompiler.report import CompileReport
from qcompiler.tools.export.model import ExportActivation, ExportLinear, ExportModel


def refuse_transforms(recipe) -> None:
    """An :class:`ExportError` naming the transform of ``recipe`` no engine format can hold."""
    found = [name for name, on in (("SmoothQuant", recipe.smoothquant), ("outlier channel splitting (OCS)",
                                   recipe.split_outliers), ("LLM.int8() decomposition", recipe.mixed_int8),
                                   ("AWQ input scales", isinstance(recipe.rounding, AWQ))) if on]
    if found:
        raise ExportError(
            f"recipe {recipe.name!r} uses {' and '.join(found)}: the exported formats (compressed-tensors, GGUF) "
            "hold plain quantized linears only, so it can not be exported yet; export a recipe without it "
            "(w8a8-dynamic, w8a8-static*, w4a16-rtn, w4a16-gptq, w4a16-hqq)")


def _activation(gm: torch.fx.GraphModule, spec) -> ExportActivation | None:
    if spec.activation is None:
        return None
    dynamic = spec.activation.startswith("dynamic")
    if dynamic and spec.activation != "dynamic_per_token":
        raise ExportError(f"{spec.module}: {spec.activation} activations have no export format (per token only)")
    scale = zero_point = None
    if not dynamic:
        scale = float(getattr(gm, spec.x_scale).reshape(-1)[0])
        if spec.x_zero_point is not None:
            zero_point = int(getattr(gm, spec.x_zero_point).reshape(-1)[0])
    return ExportActivation(bits=spec.activation_bits, symmetric=bool(spec.activation_symmetric), dynamic=dynamic,
                            scale=scale, zero_point=zero_point)


def _linear(gm: torch.fx.GraphModule, spec, bias: torch.Tensor | None) -> ExportLinear:
    q = getattr(gm, spec.w_q)
    n = q.shape[0]
    scale = getattr(gm, spec.w_scale).to(torch.float32)
    zero = getattr(gm, spec.w_zero_point) if spec.w_zero_point is not None else None
    if spec.weight_granularity == "per_tensor":
        raise ExportError(f"{spec.module}: per-tensor weights have no export format here (per channel or group)")
    group = spec.group_size if spec.weight_granularity == "per_group" else None
    shape = (n, -1)
    return ExportLinear(q=q, scale=scale.reshape(shape), zero_point=None if zero is None else zero.reshape(shape),
                        bits=spec.weight_bits, symmetric=spec.weight_symmetric, group_size=group, bias=bias,
                        activation=_activation(gm, spec))


def export_model(loaded, recipe, batch, stats=None, other_weights: bool = False) -> ExportModel:
    """The :class:`ExportModel` of ``loaded`` (a :class:`~qcompiler.tools.models.LoadedModel`) quantized
    with ``recipe`` (statistics ``stats`` when it needs them; gathered on other weights they are an error
    unless ``other_weights``), traced on the example ``batch``."""
    opts = backend.resolve(BackendOptions(recipe=recipe, stats=stats, kernels="reference",
                                          other_weights=other_weights))
    refuse_transforms(opts.recipe)
    model = loaded.model
    backend.check_made_from(opts, model.named_parameters())
    example = capture.as_batch(batch, use_cache_off=capture.accepts(model, "use_cache"))
    gm, inputs = capture.capture(model, [example], what="qcompiler export")
    capture.bind_parameters(gm, inputs[0])
    report = CompileReport(0, opts.recipe.name, opts.kernels)
    gm = pipeline.run(gm, pipeline.build(opts.recipe, torch.device("cpu"), stats=opts.stats, kernels="reference"),
                      report)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    linears = {}
    for node in gm.graph.nodes:
        spec = node.meta.get(QLINEAR)
        if spec is not None:
            linears[spec.module] = _linear(gm, spec, state.get(f"{spec.module}.bias"))
    if not linears:
        raise ExportError(f"recipe {opts.recipe.name!r} quantized no linear layer of {loaded.name}: nothing to export")
    quantized = {f"{name}.weight" for name in linears} | {f"{name}.bias" for name in linears}
    tensors = {k: v for k, v in state.items() if k not in quantized}
    config = model.config.to_dict()
    config.setdefault("architectures", [type(model).__name__])
    if not config.get("architectures"):
        config["architectures"] = [type(model).__name__]
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    if tied and "lm_head" not in linears:
        tensors.pop("lm_head.weight", None)  # the engines tie it back to the embedding
    notes = [f"qcompiler recipe {opts.recipe.name}: {len(linears)} linear layers quantized"]
    return ExportModel(config=config, tensors=tensors, linears=linears, tokenizer_dir=_tokenizer_dir(loaded),
                       source_gguf=_source_gguf(loaded), tied_embeddings=tied, notes=notes)


def _tokenizer_dir(loaded) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="qcompiler-tokenizer-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    loaded.tokenizer.save_pretrained(str(folder))
    return folder


def _source_gguf(loaded) -> Path | None:
    from qcompiler.tools import models

    try:
        return models.gguf_path(loaded.name)
    except Exception:  # noqa: BLE001 - a missing package only means there is no source GGUF
        return None
