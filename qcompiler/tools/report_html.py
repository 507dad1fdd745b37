"""``qcompiler report``: an HTML page with the pictures a user would rather look at than read.

- activation outliers: per-channel ``max|X|`` of the linear inputs with the largest outlier ratio
  (``max / median`` over channels), before and after the recipe's transforms (SmoothQuant, OCS), from
  the calibration statistics;
- per-layer SQNR of each quantized layer's output against float on an example batch
  (``qcompiler.compare``), with the pass table and the keep-one-layer-in-float attribution;
- perplexity against bits per weight of the whole model across recipes (presets and recipe files, such
  as ``qcompiler autotune``'s) on a short stretch of the evaluation text (same windows for every recipe,
  fp32 included), the Pareto front marked (also written as ``perplexity_vs_bits.json``);
- the per-layer plan (``qcompiler explain``'s table).

Every picture is written as a PNG next to ``index.html`` and embedded in it (one self-contained file).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

import torch

from qcompiler.tools.model_bits import model_bits_per_weight


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path, name: str) -> tuple[str, str]:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    data = buf.getvalue()
    (out / name).write_bytes(data)
    _figure().close(fig)
    return name, base64.b64encode(data).decode("ascii")


def outlier_ratio(ranges) -> float:
    mag = torch.maximum(ranges.channel_min.abs(), ranges.channel_max.abs()).double()
    return float(mag.max() / mag.median().clamp_min(1e-12))


def plot_outliers(stats, out: Path, layers: int = 4):
    """Per-channel max|X| before/after the transforms for the ``layers`` layers with the worst ratio."""
    plt = _figure()
    raw = stats.raw
    worst = sorted(raw, key=lambda m: -outlier_ratio(raw[m]))[:layers]
    if not worst:
        return None
    fig, axes = plt.subplots(len(worst), 1, figsize=(9, 2.4 * len(worst)), squeeze=False, layout="constrained")
    transformed = stats.activations is not stats.raw
    for ax, module in zip(axes[:, 0], worst):
        before = torch.maximum(raw[module].channel_min.abs(), raw[module].channel_max.abs())
        ax.plot(before.numpy(), lw=0.8, label=f"float input (max/median {outlier_ratio(raw[module]):.0f}x)")
        if transformed and module in stats.activations:
            a = stats.activations[module]
            after = torch.maximum(a.channel_min.abs(), a.channel_max.abs())
            ax.plot(after.numpy(), lw=0.8, alpha=0.85, label=f"after transforms ({outlier_ratio(a):.0f}x)")
        ax.set_yscale("log")
        ax.set_title(module, fontsize=9)
        ax.set_ylabel("max |x|")
        ax.legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("input channel")
    fig.suptitle("Activation outliers per input channel (calibration statistics)", fontsize=10)
    return _save(fig, out, "outliers.png")


def outliers_missing(recipe) -> str:
    """Why the outlier plot is not drawn: it plots calibration statistics, and there are none."""
    return (f"Not drawn: recipe {recipe.name} needs no calibration (its activation ranges, if any, are taken at "
            "run time), so no statistics were gathered to plot. Give `--stats DIR` (a folder written by "
            "`qcompiler calibrate --model M --recipe w8a8-static --out DIR`) to draw it.")


def plot_sqnr(comparison, out: Path):
    plt = _figure()
    layers = comparison.layers
    if not layers:
        return None
    finite = [e for e in layers if math.isfinite(e.sqnr_db)]
    order = sorted(finite, key=lambda e: e.module)
    fig, ax = plt.subplots(figsize=(10, 3.2))
    ax.bar(range(len(order)), [e.sqnr_db for e in order], width=0.9)
    ax.set_xlabel("linear layer (in name order)")
    ax.set_ylabel("output SQNR (dB)")
    ax.set_title(f"Per-layer SQNR against float, recipe {comparison.recipe}", fontsize=10)
    worst = min(order, key=lambda e: e.sqnr_db)
    ax.annotate(worst.module, (order.index(worst), worst.sqnr_db), fontsize=7, rotation=20)
    return _save(fig, out, "sqnr.png")


def pareto_front(points: list[dict]) -> list[int]:
    """Indices of the points no other point dominates (no more bits and no higher perplexity, one of them
    strictly less), in order of bits."""
    def dominated(p: dict) -> bool:
        return any(q["bpw"] <= p["bpw"] and q["perplexity"] <= p["perplexity"]
                   and (q["bpw"] < p["bpw"] or q["perplexity"] < p["perplexity"]) for q in points)

    return sorted((i for i, p in enumerate(points) if not dominated(p)), key=lambda i: points[i]["bpw"])


def plot_perplexity_vs_bits(points: list[dict], out: Path):
    """The points (``recipe``, ``bpw``, ``perplexity``, ``kind``: float / preset / file, ``pareto``), each
    labelled; the Pareto front's points filled and joined, the dominated ones hollow; recipes read from
    files (``qcompiler autotune``'s) drawn as stars."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 4.3))
    front = sorted((p for p in points if p["pareto"]), key=lambda p: p["bpw"])
    ax.plot([p["bpw"] for p in front], [p["perplexity"] for p in front], color="tab:blue", lw=1, ls="--",
            zorder=1, label="Pareto front (filled: not dominated)")
    for kind, marker, what in (("float", "s", "fp32"), ("preset", "o", "presets"), ("file", "*", "recipe files")):
        for i, p in enumerate(q for q in points if q["kind"] == kind):
            ax.scatter(p["bpw"], p["perplexity"], marker=marker, s=90 if marker == "*" else 36, zorder=2,
                       edgecolors="tab:blue", facecolors="tab:blue" if p["pareto"] else "none",
                       label=what if i == 0 else None)
    for i, p in enumerate(sorted(points, key=lambda p: p["bpw"])):  # neighbours' labels above and below
        ax.annotate(p["recipe"], (p["bpw"], p["perplexity"]), fontsize=8, xytext=(4, 4 if i % 2 else -11),
                    textcoords="offset points")
    ax.set_xscale("log", base=2)
    lowest, highest = min(p["bpw"] for p in points), max(p["bpw"] for p in points)
    ticks = [b for b in (2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32) if 0.9 * lowest <= b <= 1.1 * highest]
    ax.set_xticks(ticks, [str(b) for b in ticks])
    ax.set_xlabel("bits per weight of the whole model (embeddings, norms, LM head, scales included)")
    ax.set_ylabel("perplexity")
    ax.legend(fontsize=7)
    ax.set_title("Perplexity against bits per weight", fontsize=10)
    return _save(fig, out, "perplexity_vs_bits.png")


def perplexity_points(loaded, recipes: dict, tokens: int, other_weights: bool = False) -> list[dict]:
    """fp32 and each recipe (``name -> (recipe, stats)``) on the first ``tokens`` tokens, 512-token windows
    (``other_weights``: the backend option, for statistics gathered on other weights): ``recipe``,
    ``perplexity``, whole-model ``bpw``, ``kind`` (float, preset, or file: any other recipe) and ``pareto``."""
    from qcompiler import report
    from qcompiler.config import PRESETS
    from qcompiler.tools import evaluate, models
    from qcompiler.tools.metrics import nll

    ids = evaluate.read_tokens(models.default_text(), loaded.tokenizer, tokens)
    bos = loaded.tokenizer.bos_token_id if loaded.add_bos else None
    windows = evaluate.windows(ids, min(512, tokens), bos)

    def perplexity(model) -> float:
        with torch.inference_mode():
            total = sum(nll(evaluate.logits(model, w)[:-1], w[0, 1:]).item() for w in windows)
        return math.exp(total / sum(w.shape[1] - 1 for w in windows))

    points = [{"recipe": "fp32", "perplexity": perplexity(loaded.model), "bpw": 32.0, "kind": "float"}]
    for name, (recipe, stats) in recipes.items():
        torch._dynamo.reset()
        report.clear_reports()
        model = torch.compile(loaded.model, backend="qcompiler", options={"recipe": recipe, "stats": stats,
                                                                        "other_weights": other_weights})
        points.append({"recipe": name, "perplexity": perplexity(model),
                       "bpw": model_bits_per_weight(loaded.model, report.last_report().layers),
                       "kind": "preset" if PRESETS.get(recipe.name) is recipe else "file"})
    front = set(pareto_front(points))
    return [{**p, "pareto": i in front} for i, p in enumerate(points)]


def write(out: Path, title: str, sections: list[tuple[str, object, str]]) -> Path:
    """``sections``: (heading, (png name, base64) or None, preformatted text)."""
    out.mkdir(parents=True, exist_ok=True)
    parts = [f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}"
             "pre{font-size:11px;background:#f6f6f6;padding:8px;overflow-x:auto}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    for heading, image, text in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        if image is not None:
            name, data = image
            parts.append(f"<img alt='{html.escape(name)}' src='data:image/png;base64,{data}'>")
        if text:
            parts.append(f"<pre>{html.escape(text)}</pre>")
    parts.append("</body></html>\n")
    path = out / "index.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def build(loaded, recipe, stats, out: Path, batch, recipes: dict, tokens: int, plan: str,
          other_weights: bool = False) -> Path:
    from qcompiler.tools import compare

    out.mkdir(parents=True, exist_ok=True)
    sections = []
    heading = "Activation outliers, before and after the transforms"
    if stats is not None:
        sections.append((heading, plot_outliers(stats, out),
                         "Per-channel max|x| of the linear inputs with the largest max/median ratio."))
    else:
        sections.append((heading, None, outliers_missing(recipe)))
    comparison = compare.compare(loaded.model, recipe, batch, stats=stats, top=5, other_weights=other_weights)
    sections.append(("Per-layer SQNR", plot_sqnr(comparison, out), str(comparison)))
    points = perplexity_points(loaded, recipes, tokens, other_weights)
    (out / "perplexity_vs_bits.json").write_text(json.dumps(points, indent=1))
    table = "\n".join(f"{p['recipe']:<28} {p['bpw']:7.3f} bpw  perplexity {p['perplexity']:8.3f}  {p['kind']:<6}"
                      f"{'  Pareto front' if p['pareto'] else ''}" for p in points)
    sections.append((f"Perplexity against bits per weight (first {tokens} tokens of the evaluation text)",
                     plot_perplexity_vs_bits(points, out), table))
    sections.append(("Plan per layer", None, plan))
    return write(out, f"qcompiler report: {loaded.name}, recipe {recipe.name}", sections)
