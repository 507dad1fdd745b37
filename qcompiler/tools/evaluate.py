"""Float vs quantized, side by side in one process: accuracy, size, latency.

Perplexity convention: the text file is read as one string (``wiki.test.raw`` as is, lines joined by
its own newlines), tokenized once, and the first ``tokens`` tokens are cut into non-overlapping windows
of ``window`` tokens (a last partial window is dropped). Each window is scored on its own: every token
after the first is predicted from the tokens before it in the window; models that want a BOS token get
one prepended, and then the first token is predicted too. KL is ``KL(p_float || p_quant)`` of the
next-token distributions, averaged over predicted positions; top-1 agreement is the fraction of
positions where both models' argmax agree.

Encoders (MiniLM) are scored by the cosine similarity of mean-pooled embeddings of text passages.

Latency ratios are float time / quantized time, medians of interleaved repeats in the same process:
``decode`` is one new token on a KV cache of ``decode_context`` tokens, ``prefill`` one forward of
``prefill_tokens`` tokens.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from qcompiler import backend
from qcompiler import report as report_mod
from qcompiler.config import BackendOptions
from qcompiler.core.errors import ConfigError
from qcompiler.core.files import read_text
from qcompiler.tools.metrics import next_token_divergence, nll
from qcompiler.tools.model_bits import model_bits, model_bits_per_weight
from qcompiler.tools.models import LoadedModel
from qcompiler.tools.timing import time_interleaved


@dataclass
class EvalConfig:
    tokens: int = 20480
    window: int = 512
    speed: bool = True
    speed_repeats: int = 10
    decode_context: int = 128
    prefill_tokens: int = 512
    passages: int = 256
    progress: bool = True
    inductor_baseline: bool = False  # also time the float model compiled by Inductor

    def __post_init__(self) -> None:
        least = {"tokens": 1, "window": 2, "speed_repeats": 1, "decode_context": 1, "prefill_tokens": 1,
                 "passages": 1}
        for name, lowest in least.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < lowest:
                raise ConfigError(f"EvalConfig.{name} must be an int of at least {lowest}, got {value!r}")


@dataclass
class EvalResult:
    model: str
    recipe: str
    text: str
    convention: str
    float: dict = field(default_factory=dict)
    quantized: dict = field(default_factory=dict)
    speed: dict = field(default_factory=dict)
    weight_bytes: dict = field(default_factory=dict)
    layers: dict = field(default_factory=dict)
    pass_seconds: float = 0.0  # qcompiler's passes (Inductor's own compile time not included)
    calibration: dict = field(default_factory=dict)  # info of the calibration statistics used, if any
    compiler: str = "inductor"  # what ran the quantized graph (BackendOptions.compiler)

    def to_json(self) -> dict:
        return {
            "model": self.model, "recipe": self.recipe, "text": self.text, "convention": self.convention,
            "float": self.float, "quantized": self.quantized, "speed": self.speed,
            "weight_bytes": self.weight_bytes, "layers": self.layers, "pass_seconds": self.pass_seconds,
            "calibration": self.calibration, "compiler": self.compiler,
        }


def read_tokens(path: Path, tokenizer, limit: int) -> torch.Tensor:
    """The first ``limit`` (at least 1) token ids of the text file at ``path``, without special tokens."""
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise ConfigError(f"the number of tokens to read must be an int of at least 1, got {limit!r}")
    text = read_text(path, "text file")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    if len(ids) < limit:
        raise ConfigError(f"{path} has only {len(ids)} tokens, fewer than the {limit} asked for: ask for fewer "
                          "(--tokens) or give a longer text")
    return torch.tensor(ids[:limit], dtype=torch.long)


def compile_quantized(model: torch.nn.Module, options: BackendOptions):
    """``model`` compiled by the qcompiler backend with ``options``, through a backend function of its own:
    Dynamo (whose guards check shapes, not which tensor) then never hands it a graph compiled earlier in
    the process for another instance of the model with equal options, nor this model's to a later one."""

    def own_backend(gm, example_inputs, **_):
        return backend.qcompiler_backend(gm, example_inputs, options=options)

    own_backend.__name__ = "qcompiler"
    return torch.compile(model, backend=own_backend, isolate_recompiles=True)


def windows(ids: torch.Tensor, window: int, bos: int | None) -> list[torch.Tensor]:
    """``ids`` cut into non-overlapping ``[1, window]`` windows (the remainder dropped), each with ``bos``
    prepended when given; raises ``ConfigError`` when not one full window fits."""
    count = ids.numel() // window
    if count == 0:
        raise ConfigError(f"{ids.numel()} tokens make no full window of {window}: score more tokens or a "
                          "shorter window")
    out = []
    for i in range(count):
        chunk = ids[i * window : (i + 1) * window]
        if bos is not None:
            chunk = torch.cat([torch.tensor([bos]), chunk])
        out.append(chunk.unsqueeze(0))
    return out


class _Accumulator:
    def __init__(self) -> None:
        self.nll_float = self.nll_quant = self.kl = 0.0
        self.agree = self.count = 0

    def add(self, logits_f: torch.Tensor, logits_q: torch.Tensor, targets: torch.Tensor) -> None:
        self.nll_float += nll(logits_f, targets).item()
        self.nll_quant += nll(logits_q, targets).item()
        kl, agree = next_token_divergence(logits_f, logits_q)
        self.kl += kl.sum().item()
        self.agree += agree.sum().item()
        self.count += targets.numel()


def logits(model, ids):
    """The float32 logits ``[T, vocab]`` of a causal LM on one window ``ids [1, T]`` (no KV cache)."""
    return model(input_ids=ids, use_cache=False).logits[0].float()


def causal_lm_metrics(float_model, variants: dict, chunks: list[torch.Tensor], progress: bool = True):
    """``(float metrics, {name: metrics})`` of several quantized models scored side by side on the windows
    ``chunks`` against ``float_model`` (perplexity, KL to float, top-1 agreement), the float logits computed
    once per window."""
    accs = {name: _Accumulator() for name in variants}
    for w in tqdm(chunks, desc="perplexity windows", disable=not progress):
        logits_f = logits(float_model, w)
        for name, model in variants.items():
            accs[name].add(logits_f[:-1], logits(model, w)[:-1], w[0, 1:])
    any_acc = next(iter(accs.values()))
    return {"perplexity": math.exp(any_acc.nll_float / any_acc.count)}, {
        name: {"perplexity": math.exp(acc.nll_quant / acc.count), "kl": acc.kl / acc.count,
               "top1_agreement": acc.agree / acc.count} for name, acc in accs.items()}


def evaluate_causal_lm(loaded: LoadedModel, quantized_model, text: Path, cfg: EvalConfig):
    tok = loaded.tokenizer
    bos = tok.bos_token_id if loaded.add_bos else None
    ids = read_tokens(text, tok, cfg.tokens)
    chunks = windows(ids, cfg.window, bos)
    float_metrics, quant = causal_lm_metrics(loaded.model, {"q": quantized_model}, chunks, cfg.progress)
    convention = (
        f"first {cfg.tokens} tokens of {Path(text).name} read as one string, {len(chunks)} non-overlapping "
        f"windows of {cfg.window} tokens{' each with BOS prepended' if bos is not None else ''}, "
        f"{sum(w.shape[1] - 1 for w in chunks)} predicted tokens"
    )
    return float_metrics, quant["q"], convention


def _passages(text: Path, count: int) -> list[str]:
    lines = [ln.strip() for ln in Path(text).read_text(encoding="utf-8").splitlines()]
    paragraphs = [ln for ln in lines if len(ln) > 80 and not ln.startswith("=")]
    if not paragraphs:
        raise ValueError(f"{text} has no paragraphs to embed")
    return paragraphs[:count]


def _mean_pooled(model, batch) -> torch.Tensor:
    out = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(out.dtype)
    return (out * mask).sum(1) / mask.sum(1)


def encoder_batches(tokenizer, passages: list[str]) -> list[dict]:
    """The passages in batches of 16, 128 tokens each (padded/truncated): what encoders are scored on."""
    return [dict(tokenizer(passages[i:i + 16], padding="max_length", truncation=True, max_length=128,
                           return_tensors="pt")) for i in range(0, len(passages), 16)]


def encoder_metrics(float_model, variants: dict, batches: list[dict], progress: bool = True) -> dict:
    """``{name: metrics}``: the cosine similarity (mean, minimum) of each model's mean-pooled embeddings to
    ``float_model``'s, the float embeddings computed once per batch."""
    sims = {name: [] for name in variants}
    for batch in tqdm(batches, desc="embedding passages", disable=not progress):
        e_f = _mean_pooled(float_model, batch)
        for name, model in variants.items():
            sims[name].append(F.cosine_similarity(e_f, _mean_pooled(model, batch), dim=-1))
    return {name: {"cosine_similarity": torch.cat(s).mean().item(), "cosine_similarity_min": torch.cat(s).min().item()}
            for name, s in sims.items()}


def evaluate_encoder(loaded: LoadedModel, quantized_model, text: Path, cfg: EvalConfig):
    passages = _passages(text, cfg.passages)
    quant = encoder_metrics(loaded.model, {"q": quantized_model}, encoder_batches(loaded.tokenizer, passages),
                            cfg.progress)
    convention = (
        f"{len(passages)} paragraphs of {Path(text).name} (lines over 80 characters, headings skipped), "
        "128 tokens each (padded/truncated), mean-pooled last hidden state"
    )
    return {}, quant["q"], convention


def _median_ratio(run_float, run_quant, repeats: int) -> dict:
    medians = time_interleaved({"float": run_float, "quantized": run_quant}, repeats)
    f, q = medians["float"], medians["quantized"]
    return {"float_ms": f * 1000, "quantized_ms": q * 1000, "speedup": f / q}


def measure_speed(loaded: LoadedModel, quantized_model, cfg: EvalConfig) -> dict:
    """Float eager vs quantized; with ``cfg.inductor_baseline`` also float Inductor vs quantized."""
    out = _speed_against(loaded, loaded.model, quantized_model, cfg)
    if cfg.inductor_baseline:
        inductor = torch.compile(loaded.model)
        vs = _speed_against(loaded, inductor, quantized_model, cfg)
        out["vs_float_inductor"] = {k: v for k, v in vs.items() if isinstance(v, dict)}
    return out


def _speed_against(loaded: LoadedModel, float_model, quantized_model, cfg: EvalConfig) -> dict:
    vocab = getattr(loaded.model.config, "vocab_size", 1000)
    gen = torch.Generator().manual_seed(0)
    out = {}
    if loaded.kind == "encoder":
        batch = {
            "input_ids": torch.randint(0, vocab, (8, 128), generator=gen),
            "attention_mask": torch.ones(8, 128, dtype=torch.long),
        }
        r = _median_ratio(lambda: float_model(**batch), lambda: quantized_model(**batch), cfg.speed_repeats)
        out["encode_8x128"] = r
        out["prefill_speedup"] = r["speedup"]
        return out
    prefill = torch.randint(0, vocab, (1, cfg.prefill_tokens), generator=gen)
    r = _median_ratio(lambda: float_model(input_ids=prefill, use_cache=False),
                      lambda: quantized_model(input_ids=prefill, use_cache=False), cfg.speed_repeats)
    out[f"prefill_{cfg.prefill_tokens}"] = r
    out["prefill_speedup"] = r["speedup"]

    context = torch.randint(0, vocab, (1, cfg.decode_context), generator=gen)
    next_token = torch.randint(0, vocab, (1, 1), generator=gen)

    def decode_step(model, cache):
        def step():
            model(input_ids=next_token, cache=cache, use_cache=True)
            cache.crop(-1)  # back to decode_context tokens: every step sees the same cache length
        return step

    cache_f = loaded.model(input_ids=context, use_cache=True).cache
    cache_q = loaded.model(input_ids=context, use_cache=True).cache
    r = _median_ratio(decode_step(float_model, cache_f), decode_step(quantized_model, cache_q),
                      max(cfg.speed_repeats * 3, 10))
    out[f"decode_ctx{cfg.decode_context}"] = r
    out["decode_speedup"] = r["speedup"]
    return out


def model_weight_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen and t.is_floating_point():
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def quantized_weight_bytes(model: torch.nn.Module, layers) -> int:
    """Float bytes of the model (buffers included) with the parameters counted as ``model_bits`` counts them."""
    params = sum(p.numel() * p.element_size() for p in model.parameters() if p.is_floating_point())
    return model_weight_bytes(model) - params + model_bits(model, layers) // 8


def evaluate(loaded: LoadedModel, options: BackendOptions, text: Path, cfg: EvalConfig) -> EvalResult:
    report_mod.clear_reports()
    quantized_model = compile_quantized(loaded.model, options)
    start = time.perf_counter()
    with torch.inference_mode():
        if loaded.kind == "encoder":
            float_m, quant_m, convention = evaluate_encoder(loaded, quantized_model, text, cfg)
        else:
            float_m, quant_m, convention = evaluate_causal_lm(loaded, quantized_model, text, cfg)
        accuracy_seconds = time.perf_counter() - start
        speed = measure_speed(loaded, quantized_model, cfg) if cfg.speed else {}
    reports = report_mod.reports()
    layers = {d.module: d for r in reports for d in r.layers}
    result = EvalResult(
        model=loaded.name, recipe=options.recipe.name, text=str(text), convention=convention,
        float=float_m, quantized=quant_m, speed=speed, compiler=options.compiler,
    )
    result.weight_bytes = {
        "float": model_weight_bytes(loaded.model),
        "quantized": quantized_weight_bytes(loaded.model, layers.values()),
        "bits_per_weight": model_bits_per_weight(loaded.model, layers.values()),
    }
    result.layers = {
        "quantized": sum(d.quantized for d in layers.values()),
        "float": sorted(f"{d.module}: {d.reason}" for d in layers.values() if not d.quantized),
        "graphs_compiled": len(reports),
    }
    result.pass_seconds = sum(r.seconds for r in reports)
    result.quantized["eval_seconds"] = accuracy_seconds
    return result


def format_table(result: EvalResult) -> str:
    rows = [("", "float", "quantized")]
    for key in sorted(set(result.float) | set(result.quantized)):
        if key == "eval_seconds":
            continue
        f, q = result.float.get(key), result.quantized.get(key)
        rows.append((key, "" if f is None else f"{f:.4f}", "" if q is None else f"{q:.4f}"))
    wb = result.weight_bytes
    rows.append(("weight MB", f"{wb['float'] / 1e6:.1f}", f"{wb['quantized'] / 1e6:.1f}"))
    if "bits_per_weight" in wb:
        rows.append(("bits per weight", "", f"{wb['bits_per_weight']:.4f}"))
    for name, value in result.speed.items():
        if name == "vs_float_inductor":
            for sub, v in value.items():
                rows.append((f"{sub} ms (float Inductor)", f"{v['float_ms']:.2f}", f"{v['quantized_ms']:.2f}  ({v['speedup']:.2f}x)"))
        elif isinstance(value, dict):
            rows.append((f"{name} ms (float eager)", f"{value['float_ms']:.2f}", f"{value['quantized_ms']:.2f}  ({value['speedup']:.2f}x)"))
    width = max(len(r[0]) for r in rows)
    lines = [f"model {result.model}, recipe {result.recipe}", f"  {result.convention}"]
    lines += [f"  {a:<{width}}  {b:>12}  {c}" for a, b, c in rows]
    lines.append(f"  layers quantized: {result.layers['quantized']}, kept in float: {len(result.layers['float'])}")
    if result.calibration:
        c = result.calibration
        lines.append(f"  calibration: {c.get('batches')} batches, {c.get('tokens')} tokens, {c.get('seconds')} s")
    return "\n".join(lines)
