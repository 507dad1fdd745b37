"""What the search measures per layer (linear, or the embedding tables) and candidate: its exact bits, and its sensitivity.

**Bits.** Every floating-point parameter of the model counts once (embeddings, norms, biases, the LM head).
A linear layer's weight counts at the bytes of its stored form (``LayerDecision.weight_bytes``,
``qcompiler.core.storage``: integers packed at their bits, scales and zero points as stored; the bytes an
artifact holds for it, what ``qcompiler.last_report()`` and ``qcompiler eval`` report), or at its float bits when it stays float; the
embedding tables (searched together, :data:`EMBEDDINGS`) likewise at their stored tables' bytes. A weight
that two searched layers read (an LM head tied to the token embedding) is a tied group: its float bits count
unless both are quantized, and each quantized one adds its own copy, except where the table reads the head's
quantized weight (candidates whose fitted weight schemes store alike, a layout its rows can be gathered from;
``LayerDecision.shared_with``):
then the table's copy is not stored (``Accounting.shared``). A weight that something outside the
search also reads keeps its float bits in the fixed part, and quantizing the searched layer adds a copy.

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
from dataclasses import dataclass, field, replace

import torch
from torch import fx
from tqdm.auto import tqdm

from qcompiler import pipeline
from qcompiler.config.auto import EMBEDDINGS, AutoPrecision, Candidate, candidate_rounding, uniform_recipe
from qcompiler.core.ir import FLOAT_WEIGHT, LINEAR, PARAM_META, QEMBEDDING, QLINEAR, linear_weight
from qcompiler.passes.graph_utils import constant_value
from qcompiler.passes.quantize_embeddings import embedding_lookups, fitted_scheme, quantize_embeddings
from qcompiler.report import CompileReport
from qcompiler.tools.autotune.replay import Replay
from qcompiler.tools.compare import float_args, fresh_graph, main_output


@dataclass(frozen=True)
class Layer:
    module: str  # a linear layer's module, or config.auto.EMBEDDINGS for every embedding table at once
    numel: int
    float_bits: int  # the bits the layer costs when it stays float (0 when its weight counts elsewhere)
    widths: tuple[int, ...] = ()  # in_features (a linear), or each table's row width (the embeddings)


@dataclass
class Accounting:
    layers: list[Layer]  # the searched layers, in graph order (the embedding tables first, when searched)
    fixed_bits: int  # every parameter bit that no searched layer's choice changes
    weights: int  # floating-point parameter elements of the model (the bits-per-weight denominator)
    bits: dict[str, dict[str, int]] = field(default_factory=dict)  # candidate -> module -> bits
    # searched layers that read one float parameter (an LM head tied to the token embedding) and its bits:
    # they are saved only when every one of them is quantized
    tied: list[tuple[tuple[str, ...], int]] = field(default_factory=list)
    # candidate -> the linear layer whose quantized weight the tables read when both are on that candidate ->
    # the tables' bits that are then not stored
    shared: dict[str, dict[str, int]] = field(default_factory=dict)

    def applies(self, candidate: Candidate, module: str) -> bool:
        """An embedding table takes float and weight-only candidates; a linear layer every candidate."""
        return module != EMBEDDINGS or candidate.weight_only


def _float_bits(t: torch.Tensor) -> int:
    return t.numel() * t.element_size() * 8


def _owners(model: torch.nn.Module) -> dict[int, int]:
    """How many (module, attribute) places hold each parameter tensor (2 for a tied LM head)."""
    count: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        for _, p in module.named_parameters(recurse=False):
            count[id(p)] = count.get(id(p), 0) + 1
    return count


def _sites(gm: fx.GraphModule, auto: AutoPrecision) -> dict[str, list[tuple[torch.Tensor, int]]]:
    """The searched layers of a canonicalized graph: module -> the parameters it reads with their input
    width (graph order); the embedding tables, when searched, under :data:`EMBEDDINGS`."""
    out: dict[str, list[tuple[torch.Tensor, int]]] = {}
    if auto.embeddings:
        tables = [constant_value(gm, node.args[1]) for node, _ in embedding_lookups(gm)]
        if tables:
            out[EMBEDDINGS] = [(t, t.shape[-1]) for t in tables]
    for node in gm.graph.nodes:
        site = node.meta.get(LINEAR)
        if site is None or any(fnmatch.fnmatchcase(site.module, p) for p in auto.skip):
            continue
        _, owner, _ = linear_weight(gm, node.args[1])
        out.setdefault(site.module, [(owner, site.in_features)])
    return out


def scheme_key(candidate: Candidate, layer: Layer) -> tuple:
    """What the layer computes on ``candidate``: its scheme fitted to the layer's widths (w4-g128 on a
    576-wide layer is w4-g64 there). Two candidates with one key give the layer the same numbers."""
    if candidate.weight is None:
        return ("float",)
    fit = (lambda w: fitted_scheme(candidate.weight, w)) if layer.module == EMBEDDINGS else candidate.weight.fitted
    return (tuple(fit(w) for w in layer.widths), candidate.activation)


def accounting(model: torch.nn.Module, gm0: fx.GraphModule, inputs, auto: AutoPrecision) -> Accounting:
    """The searched layers, the fixed bits and the number of weights (no candidate's bits yet). A parameter
    counts on the one searched layer that reads it when nothing else holds it; one that several searched
    layers read and nothing else holds (a tied LM head and embedding) is a tied group's; the rest is fixed."""
    first = auto.candidates[0]
    steps = pipeline.transform_steps(uniform_recipe(auto, first), None)
    gm = pipeline.run(fresh_graph(gm0, inputs), steps, CompileReport(0, "", ""))
    sites = _sites(gm, auto)
    owners, readers = _owners(model), {}
    tensors = {}
    for module, params in sites.items():
        for p, _ in params:
            readers.setdefault(id(p), []).append(module)
            tensors[id(p)] = p
    float_bits = {m: 0 for m in sites}
    tied, grouped, kept = [], set(), set()
    for key, mods in readers.items():
        if owners.get(key, 0) != len(mods) or len(set(mods)) != len(mods):
            continue  # something outside the search holds it too (or one layer reads it twice): fixed
        if len(mods) == 1:
            float_bits[mods[0]] += _float_bits(tensors[key])
        elif grouped.isdisjoint(mods):
            tied.append((tuple(mods), _float_bits(tensors[key])))
            grouped.update(mods)
        else:
            continue
        kept.add(key)
    params = [p for p in model.parameters() if p.is_floating_point()]
    fixed = sum(_float_bits(p) for p in params if id(p) not in kept)
    layers = [Layer(m, sum(p.numel() for p, _ in ps), float_bits[m], tuple(w for _, w in ps))
              for m, ps in sites.items()]
    return Accounting(layers, fixed, sum(p.numel() for p in params), tied=tied)


def candidate_bits(gm0: fx.GraphModule, inputs, auto: AutoPrecision, candidate: Candidate, layers: list[Layer],
                   device: torch.device) -> tuple[dict[str, int], dict[str, int]]:
    """Bits of each searched layer on ``candidate``: its stored form's (compiled for ``device``, whose lowering
    decides which tables share their head's weight).
    The embedding tables' bits are their stored tables' sum (a table the scheme leaves float at its float
    bits; a table that reads a tied head's weight at what its own copy would take). Second: per linear layer
    whose weight a table reads on this candidate, that table's bits (not stored when both are on it)."""
    applicable = [layer for layer in layers if candidate.weight_only or layer.module != EMBEDDINGS]
    if candidate.weight is None:
        return {layer.module: layer.float_bits for layer in applicable}, {}
    report = CompileReport(0, candidate.name, "fast")
    recipe = uniform_recipe(auto, candidate)
    data_driven = recipe.data_driven_rounding
    if data_driven:  # GPTQ/AWQ choose other integers, stored alike: counted on nearest rounding
        recipe = replace(recipe, rounding=None)
    pipeline.run(fresh_graph(gm0, inputs), pipeline.build(recipe, device), report)
    stored = {d.module: d for d in report.layers}
    out, shared = {}, {}
    for d in report.layers:
        if d.shared_with and not data_driven:  # a GPTQ/AWQ head's integers are not shared (pipeline.build)
            shared[d.shared_with] = shared.get(d.shared_with, 0) + 8 * d.weight_bytes
    for layer in applicable:
        if layer.module == EMBEDDINGS:
            tables = [d for d in report.layers if d.table]
            out[EMBEDDINGS] = sum(8 * d.weight_bytes for d in tables)
            continue
        d = stored.get(layer.module)
        out[layer.module] = 8 * d.weight_bytes if d is not None and d.quantized else layer.float_bits
    return out, shared


class OutputError:
    """The metric between a fixed reference output and others (``kl``: mean next-token KL(reference ||
    output) over positions; ``mse``: mean squared error over the reference's variance). For ``kl`` the
    reference's probabilities and negative entropy are computed once (float64), so each output costs one
    dot product and one log-sum-exp per position: ``KL = sum p log p - sum p z + logsumexp(z)``, equal to
    ``metrics.next_token_divergence`` to float64 rounding (tested)."""

    def __init__(self, reference: torch.Tensor, metric: str) -> None:
        self.metric = metric
        if metric == "kl":
            z = reference.double().reshape(-1, reference.shape[-1])
            logp = torch.log_softmax(z, -1)
            self.p = logp.exp()
            self.neg_entropy = (self.p * logp).sum(-1)
        else:
            self.reference = reference.double()
            self.variance = self.reference.var().clamp_min(1e-30)

    def __call__(self, output: torch.Tensor) -> float:
        if self.metric == "kl":
            z = output.double().reshape(-1, output.shape[-1])
            return (self.neg_entropy - (self.p * z).sum(-1) + torch.logsumexp(z, -1)).mean().item()
        return ((output.double() - self.reference).pow(2).mean() / self.variance).item()


def _toggles(gm: fx.GraphModule) -> dict[str, list[tuple[fx.Node, tuple, tuple]]]:
    """Per module, its QDQ linears with their quantized and float arguments; every quantized embedding
    lookup under :data:`EMBEDDINGS`."""
    out: dict[str, list] = {}
    for node in gm.graph.nodes:
        spec = node.meta.get(QLINEAR)
        if spec is not None:
            out.setdefault(spec.module, []).append((node, node.args, float_args(node)))
        elif QEMBEDDING in node.meta:
            floats = (node.args[0], node.meta[FLOAT_WEIGHT], *node.args[2:])
            out.setdefault(EMBEDDINGS, []).append((node, node.args, floats))
    return out


def _set(entries, quantized: bool) -> None:
    for node, q_args, f_args in entries:
        node.args = q_args if quantized else f_args


def candidate_sensitivity(gm0: fx.GraphModule, calls: list, references: list, auto: AutoPrecision,
                          candidate: Candidate, modules: list[str], progress: bool = True, stats=None) -> dict[str, float]:
    """Each module's error at the output when it alone is on ``candidate``, averaged over the calls (the
    graph's inputs per batch; ``references``: the float outputs). 0.0 for float, or a layer the candidate
    leaves float. ``stats``: the candidate's uniform recipe calibrated (GPTQ/AWQ rounding: each layer's
    rounded weight as the sequential rounding of every layer on the candidate gave it)."""
    modules = [m for m in modules if candidate.weight_only or m != EMBEDDINGS]
    if candidate.weight is None or not modules:
        return {m: 0.0 for m in modules}
    recipe = uniform_recipe(auto, candidate)
    steps = pipeline.build(recipe, torch.device("cpu"), stats=stats, kernels="reference")
    qdq = ("insert_qdq", "quantize_embeddings")
    steps = steps[: max(i for i, s in enumerate(steps) if s.name in qdq) + 1]
    # each table on its own copy: its sensitivity alone (one that reads a tied head's weight differs in that
    # weight's rounding: the head's fp32 scales, HQQ's zero points, and on CPU int4 the kernel's bf16 scales)
    steps = [replace(s, run=lambda gm: quantize_embeddings(gm, recipe.embedding, share=False))
             if s.name == "quantize_embeddings" else s for s in steps]
    gm = pipeline.run(fresh_graph(gm0, calls[0]), steps, CompileReport(0, candidate.name, "reference"))
    toggles = _toggles(gm)
    for entries in toggles.values():
        _set(entries, quantized=False)
    errors: dict[str, list[float]] = {m: [] for m in modules}
    bar = tqdm(total=len(modules) * len(calls), desc=f"sensitivity {candidate.name}", disable=not progress, leave=False)
    for inputs, ref in zip(calls, references):
        error = OutputError(ref, auto.metric)

        def record(module, output, error=error):
            errors[module].append(error(main_output(output)))
            bar.update()
        Replay(gm, inputs).run_each(toggles, modules, _set, record)
    bar.close()
    return {m: sum(e) / len(e) if e else 0.0 for m, e in errors.items()}


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
    rounding = candidate_rounding(auto, candidate)
    what = json.dumps([repr(candidate.weight), repr(candidate.activation), repr(rounding), list(auto.skip),
                       auto.metric, data, device.type] + (["embeddings"] if auto.embeddings else []))
    return hashlib.sha256(what.encode()).hexdigest()[:20]
