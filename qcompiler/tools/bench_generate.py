"""``qcompiler bench generate``: prefill and decode tokens/s of float, float Inductor, qcompiler's recipes
and, when given its bin folder, llama.cpp's ``llama-bench`` on Q8_0 / Q4_0 GGUFs of the same model, all in
one run on one machine.

The tests are llama-bench's: prefill is a prompt of ``prefill`` tokens into an empty cache (its ``pp512``);
decode is ``decode`` new tokens, one at a time, after a context of ``depth`` tokens (its ``tg64 @ d128``).
Our models run Hugging Face's ``generate()`` (a static cache from :func:`qcompiler.compile`; the eager
float model its default dynamic cache), timed by the streamer; every candidate, llama-bench's runs
included (one repeat per turn), takes its turn, repeat after repeat, and the median of each is reported.
"""

from __future__ import annotations

import json
import statistics
import subprocess
from collections.abc import Callable
from pathlib import Path

import torch

from qcompiler.config import Recipe
from qcompiler.core.errors import ConfigError
from qcompiler.tools.llama_cpp import find_tools as find_llama_tools

LLAMA_TYPES = ("Q8_0", "Q4_0")


def _generators(loaded, recipes: dict[str, Recipe], stats_for: Callable, max_cache_len: int) -> dict[str, object]:
    import qcompiler
    from qcompiler.tools import generate

    model = loaded.model
    # Dynamo shares compiled code between models of one class compiled with equal options: without a reset,
    # a graph compiled earlier in this process (another instance of the model) would be reused, and no
    # compile report (the quantized bytes per token) recorded for this run
    torch._dynamo.reset()
    models = {"float (eager)": model,
              "float (Inductor)": generate.with_static_generate(
                  model, generate.CompiledForward(model.forward, None, backend="inductor"), max_cache_len)}
    for name, recipe in recipes.items():
        models[name] = qcompiler.compile(model, recipe, stats=stats_for(name), max_cache_len=max_cache_len)
    return models


def bench_ours(loaded, recipes: dict[str, Recipe], stats_for: Callable, prefill: int, depth: int, decode: int,
               repeats: int, progress: Callable[[str], None] = lambda s: None,
               external: dict[str, tuple[Callable[[], dict[str, float]], int]] | None = None) -> dict[str, dict]:
    """Median prefill and decode tokens/s of the float model (eager, Inductor), each recipe and each of
    ``external`` (a name -> a call that times one repeat, e.g. one llama-bench run, and the bytes of its
    weights), in turn, repeat after repeat: a machine whose speed drifts during the run (a shared host)
    slows every candidate alike."""
    external = external or {}
    from qcompiler import report
    from qcompiler.tools import chat

    vocab = loaded.model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    long_prompt = torch.randint(10, vocab, (1, prefill), generator=generator)
    context = torch.randint(10, vocab, (1, depth), generator=generator)
    models = _generators(loaded, recipes, stats_for, max(prefill + 1, depth + decode) + 1)
    runs: dict[str, dict[str, list[float]]] = {name: {"prefill": [], "decode": []} for name in models}
    weights: dict[str, int] = {}
    for round_ in range(repeats + 1):  # round 0 compiles and warms up
        for name, model in models.items():
            progress(f"{name}: round {round_}/{repeats}")
            first_new = report.next_index()
            p = chat.generate_timed(model, loaded, long_prompt, 1, 0.0, echo=False)
            d = chat.generate_timed(model, loaded, context, decode + 1, 0.0, echo=False, stop_at_eos=False)
            if round_ == 0:
                new = [r for r in report.reports() if r.graph_index >= first_new]
                weights[name] = _linear_bytes(loaded.model, new[-1] if new and name in recipes else None)
            else:
                runs[name]["prefill"].append(p.prefill_tokens_per_s)
                runs[name]["decode"].append(d.decode_tokens_per_s)
        for name, (time_once, weight_bytes) in external.items() if round_ > 0 else ():
            progress(f"{name}: round {round_}/{repeats}")
            row = time_once()
            weights[name] = weight_bytes
            runs.setdefault(name, {"prefill": [], "decode": []})
            runs[name]["prefill"].append(row["prefill_tokens_per_s"])
            runs[name]["decode"].append(row["decode_tokens_per_s"])
    kv = _kv_bytes(loaded.model.config, depth + decode // 2)
    return {name: {"prefill_tokens_per_s": statistics.median(r["prefill"]),
                   "decode_tokens_per_s": statistics.median(r["decode"]),
                   "bytes_per_token": weights[name] + kv} for name, r in runs.items()}


def _linear_bytes(model: torch.nn.Module, rep) -> int:
    """Bytes of weights a decode step reads: every linear layer (the LM head included; a tied embedding
    is read through it), at the size its kernel holds in memory (``LayerDecision.memory_bytes``), or fp32 for
    the float model."""
    sizes = {name: m.weight.numel() * m.weight.element_size() for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear)}
    if rep is not None:
        for d in rep.layers:
            if d.module in sizes:
                sizes[d.module] = d.memory_bytes if d.quantized else d.float_weight_bytes
    return int(sum(sizes.values()))


def _kv_bytes(config, positions: int) -> int:
    """fp32 keys and values of ``positions`` tokens, read once per decode step."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(2 * config.num_hidden_layers * heads * head_dim * 4 * positions)


def read_bandwidth_gbps(megabytes: int = 512, repeats: int = 5) -> float:
    """This machine's memory read bandwidth: the median time of summing a ``megabytes`` float32 tensor."""
    from qcompiler.tools.timing import time_interleaved

    x = torch.ones(megabytes * (1 << 20) // 4)
    seconds = time_interleaved({"sum": lambda: x.sum()}, repeats)["sum"]
    return x.numel() * 4 / seconds / 1e9


def make_ggufs(tools: dict[str, Path], source: Path, out_dir: Path, types=LLAMA_TYPES) -> dict[str, Path]:
    """``llama-quantize --allow-requantize`` of ``source`` into each of ``types`` (kept if already made)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    made = {}
    for kind in types:
        target = out_dir / f"{source.stem}-{kind}.gguf"
        if not target.is_file():
            partial = target.with_suffix(".gguf.partial")
            subprocess.run([str(tools["llama-quantize"]), "--allow-requantize", str(source), str(partial), kind],
                           check=True, capture_output=True)
            partial.replace(target)  # complete or absent
        made[kind] = target
    return made


def bench_llama(tools: dict[str, Path], gguf: Path, prefill: int, depth: int, decode: int, threads: int,
                repeats: int) -> dict[str, float]:
    """llama-bench's prefill (pp, depth 0) and decode (tg at ``depth``) tokens/s of ``gguf``."""
    result = {}
    for key, args in (("prefill_tokens_per_s", ["-p", str(prefill), "-n", "0"]),
                      ("decode_tokens_per_s", ["-p", "0", "-n", str(decode), "-d", str(depth)])):
        cmd = [str(tools["llama-bench"]), "-m", str(gguf), "-t", str(threads), "-r", str(repeats), "-o", "json", *args]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True)
        rows = json.loads(done.stdout)
        result[key] = float(rows[0]["avg_ts"])
    return result


def bench_generate(loaded, recipes: dict[str, Recipe], stats_for: Callable, *, prefill: int = 512, depth: int = 128,
                   decode: int = 64, repeats: int = 5, llama_cpp: str | None = None, gguf_source: Path | None = None,
                   work_dir: Path | None = None, threads: int | None = None,
                   progress: Callable[[str], None] = lambda s: None) -> dict:
    from qcompiler.tools.timing import machine_name

    if min(prefill, depth, decode, repeats) < 1:
        raise ConfigError("--prefill, --depth, --decode and --repeats must each be at least 1")
    tools = find_llama_tools(llama_cpp) if llama_cpp else None  # a wrong folder fails before any timing
    if tools is not None and gguf_source is None:
        raise ConfigError(f"{loaded.name} has no GGUF file to make llama.cpp's Q8_0/Q4_0 from; give a .gguf model")
    threads = threads or torch.get_num_threads()
    external = {}
    if tools is not None:  # llama-bench runs (one repeat each) take their turns among ours
        ggufs = make_ggufs(tools, gguf_source, work_dir or Path.home() / ".cache" / "qcompiler" / "gguf")
        for kind, path in ggufs.items():
            external[f"llama.cpp {kind}"] = (
                lambda path=path: bench_llama(tools, path, prefill, depth, decode, threads, 1), path.stat().st_size)
    rows = bench_ours(loaded, recipes, stats_for, prefill, depth, decode, repeats, progress, external)
    bandwidth = read_bandwidth_gbps()
    for row in rows.values():  # the share of the memory-bandwidth limit each decode step reaches
        row["bandwidth_limit_tokens_per_s"] = bandwidth * 1e9 / row["bytes_per_token"]
        row["of_bandwidth_limit"] = row["decode_tokens_per_s"] / row["bandwidth_limit_tokens_per_s"]
    return {"model": loaded.name, "machine": machine_name(), "threads": threads, "prefill": prefill, "depth": depth,
            "decode": decode, "repeats": repeats, "rows": rows, "read_bandwidth_gbps": bandwidth,
            "llama_cpp": None if tools is None else str(llama_cpp),
            "missing": None if tools is not None else "llama.cpp (give --llama-cpp BIN_DIR to add its rows)"}


def format_table(result: dict) -> str:
    lines = [f"{result['model']} on {result['machine']}, {result['threads']} threads; prefill {result['prefill']} "
             f"tokens, decode {result['decode']} tokens at depth {result['depth']}; median of {result['repeats']}",
             f"read bandwidth {result['read_bandwidth_gbps']:.1f} GB/s (sum of a 512 MB tensor)",
             f"{'':<20} {'prefill tok/s':>14} {'decode tok/s':>13} {'MB/token':>9} {'of BW limit':>12}"]
    for name, row in result["rows"].items():
        lines.append(f"{name:<20} {row['prefill_tokens_per_s']:>14.1f} {row['decode_tokens_per_s']:>13.1f} "
                     f"{row['bytes_per_token'] / 1e6:>9.1f} {row['of_bandwidth_limit']:>11.0%}")
    if result["missing"]:
        lines.append(f"missing: {result['missing']}")
    return "\n".join(lines)


def run_cli(args, calibrate, progress: Callable[[str], None]) -> dict:
    """`qcompiler bench generate` (``calibrate(loaded, recipe, text, samples, seq_len)`` for static recipes);
    the numeric options were checked by ``cli_args.check_numbers``."""
    from qcompiler.tools import models
    from qcompiler.tools.recipe_files import labelled_recipes

    recipes = labelled_recipes(args.recipes, taken=("float (eager)", "float (Inductor)"))  # read before loading
    tools = find_llama_tools(args.llama_cpp) if args.llama_cpp else None
    loaded = models.load_model(args.model)
    source = models.gguf_path(args.model)
    if tools is not None and source is None:
        raise ConfigError(f"{args.model} is not a GGUF model: llama.cpp's rows need one (e.g. smollm2-135m)")
    stats = {}

    def stats_for(name: str):
        recipe = recipes[name]
        if recipe.needs_calibration and name not in stats:
            stats[name] = calibrate(loaded, recipe, None, 32, 512)
        return stats.get(name)

    return bench_generate(loaded, recipes, stats_for, prefill=args.prefill, depth=args.depth,
                          decode=args.decode, repeats=args.repeats or 5, llama_cpp=args.llama_cpp, gguf_source=source,
                          threads=args.threads, progress=progress)
