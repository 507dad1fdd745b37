"""Automatic mixed precision: per layer the candidate of least summed sensitivity under an exact
bits-per-weight budget of the whole model, returned as an ordinary :class:`~qcompiler.config.Recipe`.

    result = auto_recipe(model, AutoPrecision(target_bpw=5.0), batches, cache="qcompiler-stats/")
    compiled = torch.compile(model, backend="qcompiler", options={"recipe": result.recipe})

Steps: capture the model once on the calibration batches; count every layer's bits on every candidate
(``measure``) and refuse a budget below the cheapest assignment before any long work; measure each
candidate's per-layer sensitivity (or read it from the cache); solve the multiple-choice knapsack exactly
(``knapsack``); write the assignment as a Recipe (``config.auto.recipe_for``).
"""

from __future__ import annotations

import itertools
import math
import sys
from dataclasses import dataclass, field, replace

import torch

from qcompiler.calibration.calibrate import calibrate
from qcompiler.config import Recipe
from qcompiler.config.auto import EMBEDDINGS, AutoPrecision, recipe_for, uniform_recipe
from qcompiler.core import capture
from qcompiler.core.errors import ConfigError
from qcompiler.lowering.key import GEMV_MAX_ROWS
from qcompiler.passes.quantize_embeddings import storage_key
from qcompiler.tools.autotune import knapsack, measure
from qcompiler.tools.autotune import latency as latency_mod
from qcompiler.tools.autotune.cache import SearchCache, model_fingerprint
from qcompiler.tools.compare import main_output


@dataclass(frozen=True)
class LayerChoice:
    module: str
    candidate: str
    bits: int
    sensitivity: float


@dataclass
class AutoResult:
    recipe: Recipe
    auto: AutoPrecision
    layers: list[LayerChoice]  # the searched layers (the embedding tables as one, first), graph order
    fixed_bits: int  # parameters no choice changes (norms, biases, weights read outside the search), float bits
    weights: int  # floating-point parameter elements of the model
    table: dict[str, dict[str, tuple[int, float]]]  # candidate -> module -> (bits, sensitivity)
    states: int  # the knapsack's largest frontier (0 under a latency budget)
    latency: dict | None = None  # with max_latency_ratio: the layers' decode-step time against float, the gap
    pruned: dict[str, str] = field(default_factory=dict)  # candidate -> why it was not measured nor offered
    # candidate -> the layer whose quantized weight the tables read when both are on it -> table bits not stored
    shared: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def bits(self) -> int:
        """Bits of the whole model: the fixed part plus every searched layer's choice."""
        return self.fixed_bits + sum(c.bits for c in self.layers)

    @property
    def bits_per_weight(self) -> float:
        return self.bits / self.weights

    @property
    def sensitivity(self) -> float:
        return sum(c.sensitivity for c in self.layers)

    def to_json(self) -> dict:
        return {"recipe_name": self.recipe.name, "target_bpw": self.auto.target_bpw, "metric": self.auto.metric,
                "bits": self.bits, "weights": self.weights, "bits_per_weight": self.bits_per_weight,
                "fixed_bits": self.fixed_bits, "summed_sensitivity": self.sensitivity,
                "layers": [{"module": c.module, "candidate": c.candidate, "bits": c.bits,
                            "sensitivity": c.sensitivity} for c in self.layers],
                "candidates": {name: {m: {"bits": b, "sensitivity": s} for m, (b, s) in per.items()}
                               for name, per in self.table.items()},
                "max_latency_ratio": self.auto.max_latency_ratio, "latency": self.latency, "pruned": self.pruned,
                "shared": self.shared}

    def __str__(self) -> str:
        counts: dict[str, int] = {}
        for c in self.layers:
            counts[c.candidate] = counts.get(c.candidate, 0) + 1
        used = ", ".join(f"{name} x{n}" for name, n in counts.items())
        width = max((len(c.module) for c in self.layers), default=10)
        head = (f"recipe {self.recipe.name}: {self.bits_per_weight:.4f} bits per weight ({self.bits} bits over "
                f"{self.weights} weights; target {self.auto.target_bpw:g}), summed {self.auto.metric} "
                f"{self.sensitivity:.4g}")
        lines = [head, f"  {used}"] + [f"  not offered: {name} ({why})" for name, why in self.pruned.items()]
        if self.latency is not None:
            lat = self.latency
            lines.append(f"  decode-step time of the searched layers: {lat['ratio']:.3f} x float ({1e3 * lat['seconds']:.3f} "
                         f"ms against {1e3 * lat['float_seconds']:.3f} ms; budget {self.auto.max_latency_ratio:g} x); "
                         f"summed {self.auto.metric} within {lat['gap']:.3g} of the optimum")
        for c in self.layers:
            lines.append(f"  {c.module:<{width}}  {c.candidate:<14} {c.bits / 8:>12.0f} bytes  "
                         f"{self.auto.metric} {c.sensitivity:.4g}")
        return "\n".join(lines)


def _captured(model, batches):
    if isinstance(batches, (torch.Tensor, dict)):
        batches = [batches]
    if not batches:
        raise ConfigError("the search needs calibration batches, e.g. [input_ids[:, :256]]")
    use_cache_off = capture.accepts(model, "use_cache")
    return capture.capture(model, [capture.as_batch(b, use_cache_off) for b in batches],
                           what="the automatic precision search")


@dataclass(frozen=True)
class Item:
    """One choice of the knapsack: a searched layer alone, or the layers of a tied group (their float
    parameter's ``shared`` bits count when any of them stays float); ``options``: per combination of the
    layers' candidates, ``(bits, sensitivity, candidate names)``."""

    modules: tuple[str, ...]
    options: list[tuple[int, float, tuple[str, ...]]]


def items(acc: measure.Accounting, auto: AutoPrecision, table: dict[str, dict[str, tuple[int, float]]]) -> list[Item]:
    """The knapsack's items, in the order of ``acc.layers`` (a tied group where its first layer is).
    ``table``: candidate -> module -> (bits, sensitivity), for the candidates that apply to the module."""
    tied = {m: group for group in acc.tied for m in group[0]}
    out, done = [], set()
    for layer in acc.layers:
        if layer.module in done:
            continue
        mods, shared = tied.get(layer.module, ((layer.module,), 0))
        done.update(mods)
        choices = [[c.name for c in auto.candidates if c.name in table and mod in table[c.name]] for mod in mods]
        options = []
        for combo in itertools.product(*choices):
            bits = sum(table[n][mod][0] for n, mod in zip(combo, mods))
            bits += shared if any(auto.candidate(n).weight is None for n in combo) else 0
            bits -= table_saving(acc, mods, combo, auto)
            options.append((bits, sum(table[n][mod][1] for n, mod in zip(combo, mods)), combo))
        out.append(Item(mods, options))
    return out


def table_saving(acc: measure.Accounting, mods: tuple[str, ...], combo: tuple[str, ...], auto: AutoPrecision) -> int:
    """The tables' bits not stored when the tables and a linear layer of the tied group ``mods`` are on
    candidates whose weight schemes, fitted to each, are one (the pass then shares the head's integers:
    ``w4-g128`` and ``w4-g64`` on a 576-wide model, ``w8a8-dynamic`` and ``w8-channel``) and the tables'
    candidate shared there in its own compile (``Accounting.shared``: the head's storage is one the rows are
    gathered from on this device)."""
    if EMBEDDINGS not in mods:
        return 0
    on = dict(zip(mods, combo))
    table = auto.candidate(on[EMBEDDINGS])
    layers = {layer.module: layer for layer in acc.layers}
    saved = 0
    for head, bits in acc.shared.get(table.name, {}).items():
        if head in on and _same_storage(table, auto.candidate(on[head]), layers[EMBEDDINGS], layers[head]):
            saved += bits
    return saved


def _same_storage(table, head, tables: measure.Layer, linear: measure.Layer) -> bool:
    """Whether the pass shares the head's integers with a table: their fitted schemes' ``storage_key`` agree."""
    if table.weight is None or head.weight is None:
        return False
    width = linear.widths[0]
    (fitted_head,) = measure.scheme_key(head, linear)[0]
    want = storage_key(fitted_head.bits, fitted_head.symmetric, fitted_head.granularity, fitted_head.group_size, width)
    return any(storage_key(t.bits, t.symmetric, t.granularity, t.group_size, w) == want
               for t, w in zip(measure.scheme_key(table, tables)[0], tables.widths))


def _batch_rows(batches, rows: int):
    """The first calibration batch repeated along its batch dimension to at least ``rows`` rows: the bits are
    counted on a graph where every layer sees more rows than a decode step (a BERT pooler sees one row per
    sequence), so each layer is stored as the batch kernels store it (the decode-step GEMV kernels keep 4-bit
    scales in fp32: 4.5 bits per weight at group 128 instead of 4.25)."""
    batch = batches if isinstance(batches, (torch.Tensor, dict)) else batches[0]
    first = batch if isinstance(batch, torch.Tensor) else next(v for v in batch.values() if isinstance(v, torch.Tensor))
    times = -(-rows // first.shape[0])
    if times == 1:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.repeat(times, *[1] * (batch.dim() - 1))
    return {k: v.repeat(times, *[1] * (v.dim() - 1)) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def least_bits_per_weight(acc: measure.Accounting, auto: AutoPrecision) -> float:
    table = {c: {m: (b, 0.0) for m, b in per.items()} for c, per in acc.bits.items()}
    cheapest = sum(min(o[0] for o in item.options) for item in items(acc, auto, table))
    return (acc.fixed_bits + cheapest) / acc.weights


def _check_budget(auto: AutoPrecision, acc: measure.Accounting) -> int:
    """The knapsack's budget in bits (the target's bits less the fixed part); an error below the cheapest."""
    least = least_bits_per_weight(acc, auto)
    total = math.floor(auto.target_bpw * acc.weights)
    if round(least * acc.weights) > total:
        fixed = acc.fixed_bits / acc.weights
        raise ConfigError(f"target_bpw {auto.target_bpw:g} is below the least this model can take with candidates "
                          f"{[c.name for c in auto.candidates]}: {math.ceil(least * 1e4) / 1e4:.4f} bits per weight "
                          f"(every layer on its cheapest candidate; {fixed:.4f} of them are the parameters kept "
                          "float: norms, biases, weights something outside the search reads); give at least that, or a cheaper "
                          "candidate")
    return total - acc.fixed_bits


def dominated(auto: AutoPrecision, acc: measure.Accounting) -> dict[str, str]:
    """Candidates that are another's scheme with fewer bits per integer and cost no fewer bits at any layer
    (never measured nor offered, with the reason). The stored form packs integers at their bits, so a candidate
    of fewer bits is dominated only where it quantizes no layer the other does (before, 3-bit groups were
    priced as the CPU kernel's 4-bit nibbles and were)."""
    out = {}
    for c in auto.candidates:
        for d in auto.candidates:
            if c.weight is None or d.weight is None or d.activation != c.activation or c.name in out:
                continue
            if d.weight.bits > c.weight.bits and replace(c.weight, bits=d.weight.bits) == d.weight and \
                    all(acc.bits[d.name][m] <= acc.bits[c.name][m] for m in acc.bits[c.name]):
                out[c.name] = (f"{d.name} has more levels in the same format and costs no more bits at any layer "
                               "on this device")
    return out


def _choices(knapsack_items: list[Item], chosen: tuple[int, ...], table, acc: measure.Accounting,
             auto: AutoPrecision) -> list[LayerChoice]:
    """Per searched layer its candidate, bits and sensitivity (graph order); a tied group's float bits are
    counted on its first layer that stays float (nowhere when all are quantized); tables that read a tied
    head's quantized weight count without the copy they do not store."""
    by_module = {}
    shared = dict(acc.tied)
    for item, k in zip(knapsack_items, chosen):
        extra = shared.get(item.modules, 0)
        combo = item.options[k][2]
        saving = table_saving(acc, item.modules, combo, auto)
        for name, module in zip(combo, item.modules):
            bits, value = table[name][module]
            if extra and auto.candidate(name).weight is None:
                bits, extra = bits + extra, 0
            if module == EMBEDDINGS:
                bits -= saving
            by_module[module] = LayerChoice(module, name, bits, value)
    return [by_module[layer.module] for layer in acc.layers]


def _calibrated(model: torch.nn.Module, batches, recipe, progress: bool):
    """``recipe``'s statistics on the search's batches where its rounding needs them (GPTQ, AWQ), else None."""
    if not recipe.data_driven_rounding:
        return None
    if progress:
        print(f"calibrating {recipe.name} ({type(recipe.rounding).__name__} rounding) ...", file=sys.stderr)
    return calibrate(model, batches, recipe, progress=progress)


def auto_recipe(model: torch.nn.Module, auto: AutoPrecision, batches, *, cache=None,  # long: the steps in order
                device: torch.device | str = "cpu", progress: bool = True) -> AutoResult:
    """The recipe of least summed sensitivity whose whole model fits ``auto.target_bpw`` bits per weight.

    ``batches``: calibration inputs (input-id tensors or dicts of keyword inputs, all of one shape; the
    model is captured once on them). ``cache``: a folder for the per-layer results (``None``: no cache).
    ``device``: whose kernels' storage the bits count (default CPU). The model is not changed."""
    device = torch.device(device)
    gm0, calls = _captured(model, batches)
    cached = SearchCache(cache, model_fingerprint(model))
    data = measure.data_digest(gm0, calls[0]) + "".join(measure.data_digest(gm0, c) for c in calls[1:])
    acc = measure.accounting(model, gm0, calls[0], auto)
    if not acc.layers:
        raise ConfigError("the model has no linear layer outside AutoPrecision.skip to search over")
    modules = [layer.module for layer in acc.layers]
    keys = {c.name: measure.candidate_key(auto, c, data, device) for c in auto.candidates}
    applies = {c.name: [m for m in modules if acc.applies(c, m)] for c in auto.candidates}
    found = {c.name: cached.get(keys[c.name], applies[c.name]) for c in auto.candidates}
    bits_graph = None
    for c in auto.candidates:
        hit = cached.get_bits(keys[c.name], applies[c.name])
        if hit is None and bits_graph is None:
            bits_graph = _captured(model, [_batch_rows(batches, GEMV_MAX_ROWS + 1)])
        if hit is None:
            hit = measure.candidate_bits(bits_graph[0], bits_graph[1][0], auto, c, acc.layers, device)
            if found[c.name] is not None:  # sensitivities from an older cache: kept, with the bits counted now
                cached.put(keys[c.name], c.describe(), hit[0], found[c.name][1], hit[1])
        acc.bits[c.name], acc.shared[c.name] = hit
    budget = _check_budget(auto, acc)
    pruned = dominated(auto, acc)
    for name, why in pruned.items():
        if progress:
            print(f"not measuring {name}: {why}", file=sys.stderr)
        if found[name] is None:
            cached.put(keys[name], auto.candidate(name).describe(), acc.bits[name], {}, acc.shared[name])
    with torch.inference_mode():
        references = [main_output(gm0(*inputs)) for inputs in calls]
    table: dict[str, dict[str, tuple[int, float]]] = {}
    known: dict[tuple, float] = {}  # (module, the scheme fitted to it) -> sensitivity measured already
    layer_of = {layer.module: layer for layer in acc.layers}
    for c in auto.candidates:
        if c.name in pruned:
            continue
        if found[c.name] is not None:
            sensitivity = found[c.name][1]
        else:
            keyed = {m: (m, measure.scheme_key(c, layer_of[m])) for m in applies[c.name]}
            same = {m: known[k] for m, k in keyed.items() if k in known}
            todo = [m for m in applies[c.name] if m not in same]
            if progress:
                print(f"measuring {c.name} ({c.describe()}) on {len(todo)} layers ({len(same)} the same scheme as "
                      "a candidate measured already) ...", file=sys.stderr)
            stats = _calibrated(model, batches, uniform_recipe(auto, c), progress) if todo else None
            sensitivity = {**same, **measure.candidate_sensitivity(gm0, calls, references, auto, c, todo, progress,
                                                                   stats=stats)}
            cached.put(keys[c.name], c.describe(), acc.bits[c.name], sensitivity, acc.shared[c.name])
        for m in applies[c.name]:
            known.setdefault((m, measure.scheme_key(c, layer_of[m])), sensitivity[m])
        table[c.name] = {m: (acc.bits[c.name][m], sensitivity[m]) for m in applies[c.name]}
    names = [c.name for c in auto.candidates]
    knapsack_items = items(acc, auto, table)
    options = [[(bits, value) for bits, value, _ in item.options] for item in knapsack_items]
    latency = None
    if auto.max_latency_ratio is None:
        solution = knapsack.solve(options, budget)
    else:
        linears = [m for m in modules if m != EMBEDDINGS]  # a table lookup's time is not searched: 0 for all
        times, float_times = latency_mod.candidate_latencies(gm0, auto, linears, device, progress=progress)
        for per in (*times.values(), float_times):
            per.setdefault(EMBEDDINGS, 0.0)
        reference = sum(float_times.values())
        costs = [[sum(times[n][m] for n, m in zip(combo, item.modules)) for _, _, combo in item.options]
                 for item in knapsack_items]
        solution = knapsack.solve_with_latency(options, budget, costs, auto.max_latency_ratio * reference)
        latency = {"float_seconds": reference, "seconds": solution.latency, "ratio": solution.latency / reference,
                   "gap": solution.gap, "multiplier": solution.multiplier,
                   "per_layer": {n: times[n] for n in names}, "float_per_layer": float_times}
    layers = _choices(knapsack_items, solution.choices, table, acc, auto)
    recipe = recipe_for(auto, {c.module: c.candidate for c in layers})
    return AutoResult(recipe, auto, layers, acc.fixed_bits, acc.weights, table,
                      getattr(solution, "states", 0), latency, pruned, acc.shared)
