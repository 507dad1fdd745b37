"""From a model and a recipe to the engine-neutral :class:`ExportModel` the writers take.

The backend's passes run once on a captured graph with the reference kernels (the quantize/dequantize
form); each quantized linear's integers, scales and zero points are read from the graph's buffers
(the ones the plan and ``insert_qdq`` chose, so the export is what ``qcompiler eval`` measured) and
named by the Hugging Face module they replace. Everything else is the float model's state dict.

SmoothQuant is folded into the model's own tensors: a norm's divided weight (the graph's new buffer, which
names the parameter it replaces) is written under the parameter's name, an up projection's divided rows
are already in its quantized weight, and the ``1 / s`` the backend multiplies o_proj's input by at run time
is folded into the value projection's rows (``s`` is equal across the query heads sharing a value head,
so each row has one; per row, the integers stay and only the row's scales are divided).

AWQ's shared scales are folded the same way: into the norms and the up projections' rows by the backend's
``fold_awq`` step, and o_proj's ``1 / s`` (a power of two, tied across heads) into the value projection's
rows here, with SmoothQuant's.

Recipes whose transforms change the architecture (outlier channel splitting, LLM.int8() float columns) or
divide a layer's own input (``AWQ(foldable=False)``: one ``s`` per layer, which no producer can hold for
q/k/v at once) are refused before any work.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from qcompiler import backend, pipeline
from qcompiler.config import AWQ, BackendOptions, resolve_recipe
from qcompiler.core import capture
from qcompiler.core.errors import ExportError
from qcompiler.core.ir import QLINEAR, REPLACES, VALUE_FOLD
from qcompiler.report import CompileReport
from qcompiler.tools.export.model import ExportActivation, ExportLinear, ExportModel


def refuse_transforms(recipe) -> None:
    """An :class:`ExportError` naming the transform of ``recipe`` no engine format can hold."""
    found = [name for name, on in (("outlier channel splitting (OCS)", recipe.split_outliers),
                                   ("LLM.int8() decomposition", recipe.mixed_int8),
                                   ("a rotation (its online Hadamard transforms and untied LM head)", recipe.rotation),
                                   ("quantized embedding tables (Recipe.embedding; GGUF's --gguf-embeddings rounds the "
                                    "token embedding itself)", recipe.embedding),
                                   ("AWQ(foldable=False) input scales",
                                    isinstance(recipe.rounding, AWQ) and not recipe.rounding.foldable)) if on]
    if found:
        raise ExportError(
            f"recipe {recipe.name!r} uses {' and '.join(found)}: the exported formats (compressed-tensors, GGUF) "
            "hold the model's own architecture with plain quantized linears, so it can not be exported; export "
            "a recipe without it (w8a8-dynamic, w8a8-static*, w8a8-smoothquant*, w4a16-rtn, w4a16-gptq, "
            "w4a16-hqq, the w8a16-q8_0 / w4a16-q4_* presets for GGUF)")


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
    refuse_transforms(resolve_recipe(recipe))  # before the statistics are asked for
    opts = backend.resolve(BackendOptions(recipe=recipe, stats=stats, kernels="reference",
                                          other_weights=other_weights))
    model = loaded.model
    backend.check_made_from(opts, model.named_parameters())
    example = capture.as_batch(batch, use_cache_off=capture.accepts(model, "use_cache"))
    gm, inputs = capture.capture(model, [example], what="qcompiler export")
    capture.bind_parameters(gm, inputs[0])
    report = CompileReport(0, opts.recipe.name, opts.kernels)
    gm = pipeline.run(gm, pipeline.build(opts.recipe, torch.device("cpu"), stats=opts.stats, kernels="reference"),
                      report)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    state.update(_replaced_parameters(gm, state))
    linears = {}
    for node in gm.graph.nodes:
        spec = node.meta.get(QLINEAR)
        if spec is not None:
            linears[spec.module] = _linear(gm, spec, state.get(f"{spec.module}.bias"))
    folded = _fold_value_scales(gm, linears, state)
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
    if isinstance(opts.recipe.rounding, AWQ):
        notes.append(f"AWQ input scales folded into the norms' weights, the up projections' rows and ({folded} "
                     "layers) the value projections' rows")
    if opts.recipe.smoothquant is not None:
        notes.append(f"SmoothQuant (alpha {opts.recipe.smoothquant.alpha}) folded into the norms' weights, the up "
                     f"projections' rows and ({folded} layers) the value projections' rows")
    return ExportModel(config=config, tensors=tensors, linears=linears, tokenizer_dir=_tokenizer_dir(loaded),
                       source_gguf=_source_gguf(loaded), tied_embeddings=tied, notes=notes)


def _replaced_parameters(gm: torch.fx.GraphModule, state: dict) -> dict[str, torch.Tensor]:
    """The graph's transformed copies of parameters (a norm's weight divided by SmoothQuant's ``s``), by
    the parameter's name."""
    out = {}
    for node in gm.graph.nodes:
        name = node.meta.get(REPLACES) if node.op == "get_attr" else None
        if name is None:
            continue
        if name not in state:  # a placeholder named by Dynamo, without a source
            name = capture.name_from_placeholder(name) or name
        value = getattr(gm, node.target).detach()
        if name not in state or state[name].shape != value.shape:
            raise ExportError(f"the graph's replacement of {name} does not match the model's parameter")
        out[name] = value.to(state[name].dtype)
    return out


def _fold_value_scales(gm: torch.fx.GraphModule, linears: dict[str, ExportLinear], state: dict) -> int:
    """Fold every ``1 / s`` the graph multiplies an attention's output by into the value projection's rows
    (its scales, or its float weight), in ``linears`` / ``state``; the number folded. Any other multiply of a
    layer's input that the graph does at run time is an :class:`ExportError`."""
    folded = 0
    for node in gm.graph.nodes:
        fold = node.meta.get(VALUE_FOLD) if node.op == "get_attr" else None
        if fold is None:
            continue
        if fold.module is None:
            raise ExportError(f"{node.target}: the graph divides a layer's input at run time and no producer it "
                             "could be folded into was found (a value projection, a norm): export a recipe without "
                             "SmoothQuant's attention group (SmoothQuant(groups=('norm', 'linear'))), or AWQ "
                             "calibrated on a model whose layers read norms and projections")
        inv = getattr(gm, node.target).detach().to(torch.float32).reshape(-1, fold.repeats, fold.head_dim)
        if not torch.equal(inv, inv[:, :1].expand_as(inv)):
            raise ExportError(f"{node.target}: the scales differ across the query heads that share a value head, "
                             "so no value projection row can hold them")
        rows = inv[:, 0].reshape(-1)  # 1 / s per row of the value projection
        if fold.module in linears:
            lin = linears[fold.module]
            if lin.q.shape[0] != rows.numel():
                raise ExportError(f"{fold.module}: {lin.q.shape[0]} rows, but {rows.numel()} scales to fold")
            bias = None if lin.bias is None else lin.bias * rows.to(lin.bias.dtype)
            linears[fold.module] = replace(lin, scale=lin.scale * rows[:, None], bias=bias)
        else:
            for suffix in ("weight", "bias"):
                key = f"{fold.module}.{suffix}"
                if key in state:
                    t = state[key]
                    state[key] = (t.to(torch.float32) * (rows[:, None] if t.dim() == 2 else rows)).to(t.dtype)
        folded += 1
    return folded


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
