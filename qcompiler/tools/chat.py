"""``qcompiler generate``: stream a model's text and time its prefill and decode steps.

The streamer Hugging Face's ``generate()`` calls gets the prompt first, then every new token as it is
made: the time from the prompt to the first new token is the prefill (one forward of the whole prompt),
the time from the first to the last new token is spent on decode steps.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from qcompiler.core.errors import ConfigError
from qcompiler.core.files import read_text, write_text_atomic


@dataclasses.dataclass
class GenerationTiming:
    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float
    text: str

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        steps = self.new_tokens - 1  # the first new token comes out of the prefill
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else float("nan")

    def to_json(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens,
                "prefill_s": self.prefill_s, "decode_s": self.decode_s,
                "prefill_tokens_per_s": self.prefill_tokens_per_s,
                "decode_tokens_per_s": self.decode_tokens_per_s, "text": self.text}


class _TimedStreamer:
    """A streamer that records when each piece arrives and, if ``echo``, prints the new text as it comes."""

    def __init__(self, tokenizer, echo) -> None:
        from transformers import TextStreamer

        self.times: list[float] = []
        self.text = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if echo else None

    def put(self, value) -> None:
        self.times.append(time.perf_counter())
        if self.text is not None:
            self.text.put(value)

    def end(self) -> None:
        if self.text is not None:
            self.text.end()


def encode_prompt(loaded, prompt: str, chat: bool) -> torch.Tensor:
    """The prompt's token ids: with the tokenizer's chat template if ``chat``, else with the model's BOS
    convention. An empty prompt is an error (it leaves nothing to condition on)."""
    tok = loaded.tokenizer
    if not prompt.strip():
        raise ConfigError("the prompt is empty: give --prompt TEXT or --prompt-file with some text in it")
    if chat:
        if not getattr(tok, "chat_template", None):
            raise ConfigError(f"{loaded.name}'s tokenizer has no chat template: drop --chat to give the text as is")
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      tokenize=True, return_dict=False)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
    else:
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        if loaded.add_bos and tok.bos_token_id is not None:
            ids = [tok.bos_token_id] + ids
    return torch.tensor([list(ids)])


def generate_timed(model, loaded, ids: torch.Tensor, max_new_tokens: int, temperature: float,
                   echo: bool = True, stop_at_eos: bool = True) -> GenerationTiming:
    """Generate up to ``max_new_tokens`` after ``ids`` with ``model`` (greedy when ``temperature`` is 0),
    streaming the text to stdout if ``echo``; returns the timings and the new text. ``stop_at_eos=False``
    makes exactly ``max_new_tokens`` (the end-of-text token is not a stop: what a benchmark wants; forcing
    the length with ``min_new_tokens`` instead would add two logits processors, 0.7 ms per step here)."""
    streamer = _TimedStreamer(loaded.tokenizer, echo)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=max_new_tokens, streamer=streamer,
                             pad_token_id=loaded.tokenizer.eos_token_id,
                             **({} if stop_at_eos else {"eos_token_id": None}), **sampling)
    if echo:
        sys.stdout.flush()
    new = out[0, ids.shape[1]:]
    times = streamer.times  # [prompt, token 1, ..., token n]
    prefill = times[1] - times[0] if len(times) > 1 else float("nan")
    decode = times[-1] - times[1] if len(times) > 2 else 0.0
    return GenerationTiming(prompt_tokens=int(ids.shape[1]), new_tokens=int(new.numel()), prefill_s=prefill,
                            decode_s=decode, text=loaded.tokenizer.decode(new, skip_special_tokens=True))


def alternate_decode_steps(model, loaded, ctx: torch.Tensor, ways: dict, repeats: int, new: int) -> dict[str, list[float]]:
    """An A/B of decode steps in one process: ``ways`` maps a name to a call that switches ``model`` to that
    way; each round runs every way in turn and times a greedy ``new``-step generate after ``ctx`` as
    ``qcompiler bench generate`` does (:func:`generate_timed`). Returns each way's ms per step, round by
    round; raises if the ways made different text."""
    times: dict[str, list[float]] = {name: [] for name in ways}
    texts = {}
    generate_timed(model, loaded, ctx, 4, 0.0, echo=False)  # compiles the prompt's and the decode step's graphs
    for _ in range(repeats):
        for name, switch in ways.items():
            switch()
            timed = generate_timed(model, loaded, ctx, new + 1, 0.0, echo=False, stop_at_eos=False)
            times[name].append(1e3 / timed.decode_tokens_per_s)
            texts[name] = timed.text
    if len(set(texts.values())) > 1:
        raise ConfigError(f"the ways {sorted(ways)} made different text: {texts}")
    return times


def format_timings(rows: dict[str, GenerationTiming]) -> str:
    lines = [f"{'model':<22} {'prompt':>6} {'new':>5} {'prefill tok/s':>14} {'decode tok/s':>13}"]
    for name, t in rows.items():
        lines.append(f"{name:<22} {t.prompt_tokens:>6} {t.new_tokens:>5} {t.prefill_tokens_per_s:>14.1f} "
                     f"{t.decode_tokens_per_s:>13.1f}")
    return "\n".join(lines)


def _read_prompt(args) -> str:
    if args.prompt is not None:
        return args.prompt
    return read_text(args.prompt_file, "prompt file")


def run_cli(args, calibrate) -> int:
    """`qcompiler generate` (``calibrate(loaded, recipe, text, samples, seq_len)`` gathers statistics)."""
    import torch

    import qcompiler
    from qcompiler.calibration.stats import resolve_stats
    from qcompiler.tools import generate, models
    from qcompiler.tools.recipe_files import recipe_argument

    if args.temperature < 0:
        raise ConfigError(f"--temperature must be 0 (greedy) or more, got {args.temperature}")
    prompt_text = _read_prompt(args)
    recipe = None if args.artifact else recipe_argument(args.recipe)
    stats = resolve_stats(args.stats)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"loading {args.model} ...", file=sys.stderr)
    loaded = models.load_model(args.model)
    ids = encode_prompt(loaded, prompt_text, args.chat)
    cache = generate.resolve_max_cache_len(loaded.model, args.max_cache_len)
    generate.check_generation(loaded.model, ids, args.max_new_tokens, cache)  # before calibrating or compiling
    if recipe is not None and stats is None and recipe.needs_calibration:
        stats = calibrate(loaded, recipe, args.calib_text, args.samples, args.seq_len)
    quantized = qcompiler.compile(loaded.model, recipe, stats=stats, artifact=args.artifact, max_cache_len=cache,
                                  lm_head=args.lm_head)
    print("compiling the prompt and decode graphs ...", file=sys.stderr)
    generate_timed(quantized, loaded, ids, min(2, args.max_new_tokens), 0.0, echo=False)
    name = Path(args.artifact).name if args.artifact else recipe.name
    rows = {}
    for label, model in [(name, quantized)] + ([("float (eager)", loaded.model)] if args.compare_float else []):
        print(f"--- {label}", file=sys.stderr)
        rows[label] = generate_timed(model, loaded, ids, args.max_new_tokens, args.temperature)
        print(file=sys.stderr)
    print(format_timings(rows), file=sys.stderr)
    if args.json_out:
        write_text_atomic(args.json_out, json.dumps({k: v.to_json() for k, v in rows.items()}, indent=2))
    return 0


DEMO_PROMPT = "Write one sentence about why smaller language models are useful."


def run_demo_generation(model: str, recipe: str, max_new_tokens: int = 48) -> GenerationTiming:
    """The end of ``qcompiler demo``: a short greedy generation with the quantized model, streamed, timed."""
    import qcompiler
    from qcompiler.tools import models

    loaded = models.load_model(model)
    ids = encode_prompt(loaded, DEMO_PROMPT, chat=bool(getattr(loaded.tokenizer, "chat_template", None)))
    quantized = qcompiler.compile(loaded.model, recipe, max_cache_len=ids.shape[1] + max_new_tokens)
    print(f"compiling {recipe} for generation ...", file=sys.stderr)
    generate_timed(quantized, loaded, ids, 2, 0.0, echo=False)
    print(f"\n{recipe} generation, prompt: {DEMO_PROMPT}")
    timing = generate_timed(quantized, loaded, ids, max_new_tokens, 0.0)
    print(format_timings({recipe: timing}))
    return timing
