"""Automatic mixed precision: the candidate schemes per layer, the bits-per-weight target, and the
ordinary :class:`Recipe` an assignment of candidates to layers becomes.

``qcompiler.tools.autotune.auto_recipe(model, AutoPrecision(target_bpw=5.0), batches)`` measures each
candidate's bits and sensitivity per layer and solves the knapsack; :func:`recipe_for` writes its answer
as a Recipe with one :class:`LayerOverride` per layer that differs from the most common candidate, and
the layers kept float in ``skip``: it saves, loads, explains, exports and compiles like any preset.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

from qcompiler.config.methods import AWQ, GPTQ, HQQ
from qcompiler.config.recipe import Recipe
from qcompiler.config.schemes import ActivationScheme, LayerOverride, LayerScheme, WeightScheme
from qcompiler.core.errors import ConfigError, ConfigTypeError

METRICS = ("kl", "mse")
EMBEDDINGS = "(embeddings)"  # the search's name for every embedding table at once (one Recipe.embedding scheme)
_PATTERN_CHARACTERS = "*?["


@dataclass(frozen=True)
class Candidate:
    """One scheme a layer may take: ``weight`` None keeps the layer float; ``activation`` None is weight-only.
    Dynamic activations only: a static range would need calibration statistics per candidate."""

    name: str
    weight: WeightScheme | None = None
    activation: ActivationScheme | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError("Candidate.name must be a non-empty string, e.g. 'w4-g128'")
        if self.weight is not None and not isinstance(self.weight, WeightScheme):
            raise ConfigTypeError(f"Candidate {self.name!r}: weight must be a WeightScheme or None")
        if self.activation is not None and not isinstance(self.activation, ActivationScheme):
            raise ConfigTypeError(f"Candidate {self.name!r}: activation must be an ActivationScheme or None")
        if self.weight is None and self.activation is not None:
            raise ConfigError(f"Candidate {self.name!r}: a float layer (weight=None) has no activation scheme")
        if self.activation is not None and not self.activation.dynamic:
            raise ConfigError(f"Candidate {self.name!r}: static activations need calibration statistics per "
                              "candidate, which the search does not gather; use a dynamic activation scheme")

    @property
    def weight_only(self) -> bool:
        """Float or weight-only: what an embedding table may take (a lookup has no input to quantize)."""
        return self.activation is None

    @property
    def scheme(self) -> LayerScheme | None:
        return None if self.weight is None else LayerScheme(self.weight, self.activation)

    def describe(self) -> str:
        return "float" if self.scheme is None else self.scheme.describe()


def _group(bits: int, group_size: int) -> WeightScheme:
    # fp16 scales and offsets (GGUF's d and m): stored in 16 + 16 bits per group, exactly (qcompiler.core.storage)
    return WeightScheme(bits=bits, granularity="per_group", group_size=group_size, symmetric=False, fit_group=True,
                        fp16_scales=True)


_W8 = WeightScheme(bits=8, granularity="per_channel", symmetric=True)
CANDIDATES: dict[str, Candidate] = {c.name: c for c in (
    Candidate("float"),
    Candidate("w8a8-dynamic", _W8, ActivationScheme(bits=8, granularity="per_token", symmetric=True)),
    Candidate("w8-channel", _W8),  # weight-only int8 per output channel
    Candidate("w4-g128", _group(4, 128)),
    Candidate("w4-g64", _group(4, 64)),
    Candidate("w3-g64", _group(3, 64)),
)}
DEFAULT_CANDIDATES = tuple(CANDIDATES)


def resolve_candidate(candidate: str | Candidate) -> Candidate:
    if isinstance(candidate, Candidate):
        return candidate
    if isinstance(candidate, str):
        if candidate not in CANDIDATES:
            raise ConfigError(f"unknown candidate {candidate!r}; the named candidates are: {', '.join(CANDIDATES)} "
                              "(or give a qcompiler.config.auto.Candidate)")
        return CANDIDATES[candidate]
    raise ConfigTypeError(f"a candidate is a name or a Candidate, got {type(candidate).__name__}")


@dataclass(frozen=True)
class AutoPrecision:
    """The search: per linear layer one of ``candidates``, least summed sensitivity (``metric`` at the
    model's output with that layer alone quantized) under ``target_bpw`` bits per weight of the whole model
    (every parameter: embeddings, norms and the LM head included, at their stored bits).

    ``skip``: layers kept float whatever the budget (the LM head is not in it: a candidate may quantize it).
    ``embeddings``: also choose the embedding tables' scheme (one for all of them, ``Recipe.embedding``) among
    the float and weight-only candidates; a table tied to a searched LM head is priced with it (its float
    bits are saved only when both are quantized, and on candidates that store alike the table reads the
    head's quantized weight: one copy).
    ``rounding``: None (round to nearest), HQQ() for the layers on asymmetric candidates (the symmetric
    ones round to nearest), or GPTQ()/AWQ() for every quantized layer (data-driven: each candidate is
    calibrated on the search's batches, and the recipe found needs ``qcompiler.calibrate`` before it
    compiles, as any GPTQ/AWQ recipe; ``qcompiler autotune`` does it and saves the statistics beside it).
    ``samples`` x ``seq_len``: the calibration tokens the sensitivities are measured on.
    ``max_latency_ratio``: also keep the searched layers' summed decode-step time (each layer's kernels on
    one token, timed on this machine) within this multiple of their float time (None: no latency budget).
    """

    target_bpw: float
    candidates: tuple = DEFAULT_CANDIDATES
    metric: str = "kl"
    rounding: GPTQ | AWQ | HQQ | None = None
    skip: tuple[str, ...] = ("*embed*",)
    samples: int = 3  # x seq_len: SmolLM2's search stays under 15 minutes on 2 cores
    seq_len: int = 256
    name: str = ""
    max_latency_ratio: float | None = None
    embeddings: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.target_bpw, bool) or not isinstance(self.target_bpw, (int, float)) or \
                not math.isfinite(self.target_bpw) or self.target_bpw <= 0:
            raise ConfigError(f"AutoPrecision.target_bpw must be a positive number of bits per weight, e.g. 5.0; "
                              f"got {self.target_bpw!r}")
        if isinstance(self.candidates, (str, Candidate)) or not self.candidates:
            raise ConfigError("AutoPrecision.candidates must be a non-empty tuple of candidate names or Candidates, "
                              f"e.g. {DEFAULT_CANDIDATES}")
        resolved = tuple(resolve_candidate(c) for c in self.candidates)
        names = [c.name for c in resolved]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ConfigError(f"AutoPrecision.candidates names {twice} more than once; give each candidate once")
        object.__setattr__(self, "candidates", resolved)
        if self.metric not in METRICS:
            raise ConfigError(f"AutoPrecision.metric must be one of {', '.join(METRICS)}; got {self.metric!r} "
                              "(kl: next-token KL of a language model's logits; mse: relative squared error of the "
                              "output, for encoders)")
        if self.rounding is not None and not isinstance(self.rounding, (GPTQ, AWQ, HQQ)):
            raise ConfigTypeError("AutoPrecision.rounding must be None (round to nearest), HQQ(), GPTQ() or AWQ(), "
                                  f"got {type(self.rounding).__name__}")
        if isinstance(self.rounding, HQQ) and not any(c.weight is not None and not c.weight.symmetric for c in resolved):
            raise ConfigError("AutoPrecision: HQQ rounding fits zero points, and no candidate has asymmetric weights; "
                              "add one (w4-g128, w4-g64, w3-g64) or use round to nearest (rounding=None)")
        if isinstance(self.skip, str) or not all(isinstance(p, str) for p in self.skip):
            raise ConfigTypeError("AutoPrecision.skip must be a tuple of module-name patterns, e.g. ('*embed*',)")
        object.__setattr__(self, "skip", tuple(self.skip))
        if not isinstance(self.embeddings, bool):
            raise ConfigError(f"AutoPrecision.embeddings must be True or False, got {self.embeddings!r}")
        r = self.max_latency_ratio
        if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or r <= 0):
            raise ConfigError(f"AutoPrecision.max_latency_ratio must be a positive number (e.g. 0.8: the quantized "
                              f"layers at most 80% of their float time) or None; got {r!r}")
        for field_name, lowest in (("samples", 1), ("seq_len", 2)):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
                raise ConfigError(f"AutoPrecision.{field_name} must be an integer of at least {lowest}, got {value!r}")

    @property
    def recipe_name(self) -> str:
        return self.name or f"auto-{self.target_bpw:g}bpw"

    def candidate(self, name: str) -> Candidate:
        found = next((c for c in self.candidates if c.name == name), None)
        if found is None:
            raise ConfigError(f"{name!r} is not one of this search's candidates: {[c.name for c in self.candidates]}")
        return found


def uniform_recipe(auto: AutoPrecision, candidate: Candidate) -> Recipe:
    """Every layer not in ``auto.skip`` on ``candidate`` (what one candidate's bits and errors are measured on),
    and the embedding tables too when the search takes them and the candidate is weight-only."""
    if candidate.weight is None:
        return Recipe(name=f"uniform-{candidate.name}", skip=("*",))
    embedding = candidate.weight if auto.embeddings and candidate.weight_only else None
    return Recipe(name=f"uniform-{candidate.name}", weight=candidate.weight, activation=candidate.activation,
                  skip=auto.skip, rounding=candidate_rounding(auto, candidate), embedding=embedding)


def candidate_rounding(auto: AutoPrecision, candidate: Candidate):
    """How ``candidate``'s weights are rounded: HQQ fits zero points (asymmetric candidates only, the others
    round to nearest); GPTQ and AWQ round every quantized weight."""
    if candidate.weight is None or isinstance(auto.rounding, HQQ) and candidate.weight.symmetric:
        return None
    return auto.rounding


def recipe_for(auto: AutoPrecision, assignment: Mapping[str, str]) -> Recipe:
    """The Recipe giving each module (exact name) the candidate ``assignment`` names: the most common
    quantized candidate is the recipe's own scheme, the others are one :class:`LayerOverride` per layer,
    float layers are added to ``skip`` by name (after ``auto.skip``); :data:`EMBEDDINGS`' candidate becomes
    ``Recipe.embedding`` (its weight scheme, or None for float)."""
    chosen = {module: auto.candidate(name) for module, name in assignment.items()}
    table = chosen.pop(EMBEDDINGS, None)
    embedding = None if table is None else table.weight
    odd = [m for m in chosen if any(ch in m for ch in _PATTERN_CHARACTERS)]
    if odd:
        raise ConfigError(f"module names {odd[:3]} hold pattern characters ({_PATTERN_CHARACTERS}): a recipe "
                          "could not name them alone")
    counts = Counter(c.name for c in chosen.values() if c.weight is not None)
    roundings = [candidate_rounding(auto, c) for c in chosen.values()]
    rounding = auto.rounding if any(r is not None for r in roundings) else None  # HQQ: only with an asymmetric layer
    if not counts:
        return Recipe(name=auto.recipe_name, skip=(*auto.skip, *chosen), rounding=rounding, embedding=embedding)
    order = {c.name: i for i, c in enumerate(auto.candidates)}
    base = auto.candidate(min(counts, key=lambda n: (-counts[n], order[n])))
    overrides = []
    for module, c in chosen.items():
        if c.weight is None or c.name == base.name:
            continue
        if c.activation is None:
            overrides.append(LayerOverride(module, weight=c.weight, weight_only=True))
        else:
            overrides.append(LayerOverride(module, weight=c.weight, activation=c.activation))
    floats = tuple(m for m, c in chosen.items() if c.weight is None)
    return Recipe(name=auto.recipe_name, weight=base.weight, activation=base.activation,
                  skip=(*auto.skip, *floats), overrides=tuple(overrides), rounding=rounding, embedding=embedding)
