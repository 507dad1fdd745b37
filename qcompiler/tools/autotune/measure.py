"""What the search measures per linear layer and candidate: its exact bits, and its sensitivity.

**Bits.** Every floating-point parameter of the model counts once (embeddings, norms, biases, the LM head).
A linear layer's weight counts at the bytes the backend stores for it on this device (``LayerDecision.
weight_bytes`` after ``lower``: integers, scales and zero points at the kernel's widths, what
``qcompiler.last_report()`` and ``qcompiler eval`` report), or at its float bits when it stays float. A
weight that something else also reads (an LM head tied to the token embedding) keeps its float bits in
the fixed part, and quantizing that layer adds its quantized copy.

**Sensitivity.** The model is captured once on the calibration batch; per candidate the pipeline runs to
``insert_qdq`` with every searched layer on that candidate (the quantize/dequantize graph that
``qcompiler.compare`` reads). Then every layer is put back to float (``compare.float_args``) and each in
turn alone is quantized: its sensitivity is the metric between the float model's output and that graph's
(``kl``: mean next-token KL of the logits; ``mse``: the output's mean squared error over its variance).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from dataclasses import dataclass, field

import torch
from torch import fx
from tqdm.auto import tqdm

from qcompiler import pipeline
from qcompiler.config.auto import AutoPrecision, Candidate, uniform_recipe
from qcompiler.core.ir import LINEAR, PARAM_META, QLINEAR, linear_weight
from qcompiler.report import CompileReport
from qcompiler.tools.compare import float_args, fresh_graph, main_output
from qcompiler.tools.metrics import next_token_divergence


@dataclass(frozen=True)
class Layer:
    module: str
    numel: int
    float_bits: int  # the bits the layer costs when it stays float (0 when its weight counts in the fixed part)


@dataclass
class Accounting:
    layers: list[Layer]  # the searched linear layers, in graph order
    fixed_bits: int  # every parameter bit that no searched layer's choice changes
    weights: int  # floating-point parameter elements of the model (the bits-per-weight denominator)
    bits: dict[str, dict[str, int]] = field(default_factory=dict)  # candidate -> module -> bits


def _float_bits(t: torch.Tensor) -> int:
    return t.numel() * t.element_size() * 8


def _owners(model: torch.nn.Module) -> dict[int, int]:
    """How many (module, attribute) places hold each parameter tensor (2 for a tied LM head)."""
    count: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        for _, p in module.named_parameters(recurse=False):
            count[id(p)] = count.get(id(p), 0) + 1
    return count


def _sites(gm: fx.GraphModule, auto: AutoPrecision) -> dict[str, torch.Tensor]:
    """The searched linear layers of a canonicalized graph: module -> its weight parameter (graph order)."""
    out: dict[str, torch.Tensor] = {}
    for node in gm.graph.nodes:
        site = node.meta.get(LINEAR)
        if site is None or any(fnmatch.fnmatchcase(site.module, p) for p in auto.skip):
            continue
        _, owner, _ = linear_weight(gm, node.args[1])
        out.setdefault(site.module, owner)
    return out


def accounting(model: torch.nn.Module, gm0: fx.GraphModule, inputs, auto: AutoPrecision) -> Accounting:
    """The searched layers, the fixed bits and the number of weights (no candidate's bits yet)."""
    first = auto.candidates[0]
    steps = pipeline.transform_steps(uniform_recipe(auto, first), None)
    gm = pipeline.run(fresh_graph(gm0, inputs), steps, CompileReport(0, "", ""))
    sites = _sites(gm, auto)
    owners, users = _owners(model), {}
    for weight in sites.values():
        users[id(weight)] = users.get(id(weight), 0) + 1
    separable = {id(w) for w in sites.values() if owners.get(id(w), 0) == 1 and users[id(w)] == 1}
    params = [p for p in model.parameters() if p.is_floating_point()]
    fixed = sum(_float_bits(p) for p in params if id(p) not in separable)
    layers = [Layer(m, w.numel(), _float_bits(w) if id(w) in separable else 0) for m, w in sites.items()]
    return Accounting(layers, fixed, sum(p.numel() for p in params))


def candidate_bits(gm0: fx.GraphModule, inputs, auto: AutoPrecision, candidate: Candidate, layers: list[Layer],
                   device: torch.device) -> dict[str, int]:
    """Bits of each searched layer on ``candidate``: what the backend stores on ``device`` (after lowering)."""
    if candidate.weight is None:
        return {layer.module: layer.float_bits for layer in layers}
    report = CompileReport(0, candidate.name, "fast")
    pipeline.run(fresh_graph(gm0, inputs), pipeline.build(uniform_recipe(auto, candidate), device), report)
    stored = {d.module: d for d in report.layers}
    out = {}
    for layer in layers:
        d = stored.get(layer.module)
        out[layer.module] = 8 * d.weight_bytes if d is not None and d.quantized else layer.float_bits
    return out


def output_error(reference: torch.Tensor, output: torch.Tensor, metric: str) -> float:
    """``kl``: mean next-token KL(reference || output) over positions; ``mse``: mean squared error / variance."""
    if metric == "kl":
        return next_token_divergence(reference, output)[0].mean().item()
    ref = reference.double()
    return ((output.double() - ref).pow(2).mean() / ref.var().clamp_min(1e-30)).item()


def _toggles(gm: fx.GraphModule) -> dict[str, list[tuple[fx.Node, tuple, tuple]]]:
    """Per module, its QDQ linears with their quantized and float arguments."""
    out: dict[str, list] = {}
    for node in gm.graph.nodes:
        spec = node.meta.get(QLINEAR)
        if spec is not None:
            out.setdefault(spec.module, []).append((node, node.args, float_args(node)))
    return out


def _set(entries, quantized: bool) -> None:
    for node, q_args, f_args in entries:
        node.args = q_args if quantized else f_args


def candidate_sensitivity(gm0: fx.GraphModule, calls: list, references: list, auto: AutoPrecision,
                          candidate: Candidate, modules: list[str], progress: bool = True) -> dict[str, float]:
    """Each module's error at the output when it alone is on ``candidate``, averaged over the calls (the
    graph's inputs per batch; ``references``: the float outputs). 0.0 for float, or a layer the candidate
    leaves float."""
    if candidate.weight is None:
        return {m: 0.0 for m in modules}
    steps = pipeline.build(uniform_recipe(auto, candidate), torch.device("cpu"), kernels="reference")
    steps = steps[: next(i for i, s in enumerate(steps) if s.name == "insert_qdq") + 1]
    gm = pipeline.run(fresh_graph(gm0, calls[0]), steps, CompileReport(0, candidate.name, "reference"))
    toggles = _toggles(gm)
    for entries in toggles.values():
        _set(entries, quantized=False)
    out = {}
    with torch.inference_mode():
        for module in tqdm(modules, desc=f"sensitivity {candidate.name}", disable=not progress, leave=False):
            if module not in toggles:
                out[module] = 0.0
                continue
            _set(toggles[module], quantized=True)
            gm.recompile()
            errors = [output_error(ref, main_output(gm(*inputs)), auto.metric) for inputs, ref in zip(calls, references)]
            out[module] = sum(errors) / len(errors)
            _set(toggles[module], quantized=False)
    return out


def data_digest(gm0: fx.GraphModule, inputs) -> str:
    """SHA-256 over the graph's non-parameter inputs (the calibration batch)."""
    digest = hashlib.sha256()
    for node, value in zip([n for n in gm0.graph.nodes if n.op == "placeholder"], inputs):
        if PARAM_META not in node.meta and isinstance(value, torch.Tensor):
            digest.update(f"{value.dtype}|{tuple(value.shape)}|".encode())
            digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def candidate_key(auto: AutoPrecision, candidate: Candidate, data: str, device: torch.device) -> str:
    """What a candidate's cached numbers depend on: its schemes, the rounding, the skip list, the metric,
    the calibration data and the device whose kernels store the weights."""
    what = json.dumps([repr(candidate.weight), repr(candidate.activation), repr(auto.rounding), list(auto.skip),
                       auto.metric, data, device.type])
    return hashlib.sha256(what.encode()).hexdigest()[:20]
