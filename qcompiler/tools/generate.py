"""Generation that runs the quantized graphs: ``qcompiler.compile(model, ...)`` and its ``generate()``.

``torch.compile(model, backend="qcompiler")`` returns a wrapper whose ``generate`` is the original
module's: Hugging Face's generation loop then calls the float model. :func:`compile` instead returns a
shallow copy of the model (its modules and parameters are shared, the model you passed is not
changed) whose ``forward`` is compiled by the backend, and whose ``generate`` is Hugging Face's with
a preallocated (static) KV cache of ``max_cache_len`` positions:

- the prompt (any length up to the cache) and the decode steps compile exactly two graphs per batch
  size and dtype: one for prompts (their length is marked dynamic) and one for single-token steps
  (fixed shapes, so its linear layers take the C++ GEMV kernels);
- sampling options, streamers, stop tokens, batches with (left) padding are Hugging Face's; its greedy
  and sampling loop runs with leaner per-step input preparation (:mod:`qcompiler.tools.decode_loop`);
- a prompt that is empty or does not fit the cache with its ``max_new_tokens``, ``max_new_tokens``
  below 1, or a model with no generation head are errors that say what to do, before anything runs.
"""

from __future__ import annotations

import copy
import dataclasses
import functools

import torch

from qcompiler import backend
from qcompiler.config import BackendOptions, resolve_recipe, with_int8_lm_head
from qcompiler.core.errors import ConfigError
from qcompiler.tools.decode_loop import DecodeLoopStats, with_decode_loop
from qcompiler.tools.replay import Recorder, Replay

DEFAULT_MAX_CACHE_LEN = 1024


def _sequence_dim(name: str, value: torch.Tensor) -> int | None:
    """Which dimension of a forward input is the sequence (the prompt length), if it has one."""
    if name == "cache_position":
        return 0
    if name == "attention_mask":
        return {2: 1, 4: 2}.get(value.dim())  # [B, L] or [B, 1, L, cache]: the query length
    if name in ("input_ids", "position_ids", "inputs_embeds") and value.dim() >= 2:
        return 1
    return None


class _OwnBackend:
    """The qcompiler backend with fixed options, for one :class:`CompiledForward` (equal to no other)."""

    def __init__(self, options: dict) -> None:
        self.options = options
        self.__name__ = "qcompiler"

    def __call__(self, gm, example_inputs, **_):
        return backend.qcompiler_backend(gm, example_inputs, options=self.options)


def _guard_filter(entries) -> list[bool]:
    """The guards Dynamo keeps for a compiled forward: those on its inputs (tensors' shapes, dtypes,
    the cache object's layout), not those on the model's modules or on module globals (the Python
    functions and registries the forward looked up, e.g. Hugging Face's attention functions).
    Checking those costs about 0.2 ms per decode step; the graphs are a snapshot of the model and of
    the code it ran at compile time, as the module docstring says."""
    modules = torch.compiler.skip_guard_on_all_nn_modules_unsafe(entries)
    return [keep and not entry.is_global for keep, entry in zip(modules, entries, strict=True)]


class CompiledForward:
    """A model's ``forward`` compiled by ``backend`` (qcompiler's, with ``options``; or e.g. "inductor",
    the float baseline of ``qcompiler bench generate``). Calls with more than one token (prompts) mark
    their sequence dimension dynamic, so prompts of every length share one graph; single-token calls
    (decode steps) get their own graph with fixed shapes."""

    def __init__(self, forward, options: BackendOptions | None, backend: str = "qcompiler") -> None:
        # Guards on the modules (their parameters, attributes) are skipped: the compiled graphs are a
        # snapshot of the model at compile time anyway (compile again after changing it), and checking
        # some 300 tensors' guards costs ~2 ms per decode step.
        # qcompiler's graphs hold quantized copies of this model's weights: a backend object of its own
        # (compared by identity) keeps Dynamo from reusing them for another model of the same class, and
        # isolate_recompiles gives this compile its own recompile limit (shared, a process that compiled
        # the same model class a few times would fall back to running the float model eagerly).
        if backend == "qcompiler":
            backend = _OwnBackend({f.name: getattr(options, f.name) for f in dataclasses.fields(options)})
        self.recorder = Recorder(backend)  # decode steps replay the graph without Dynamo (replay.py)
        self.compiled = torch.compile(forward, backend=self.recorder, isolate_recompiles=True, options={
            "guard_filter_fn": _guard_filter})
        self.replay: Replay | None = None  # the graph call decode steps repeat, once two steps agree on it
        self.recorded: Replay | None = None  # the last decode step's recording
        self.replayed = 0  # decode steps that called the graph directly
        functools.update_wrapper(self, forward)

    def __call__(self, *args, **kwargs):
        named = dict(kwargs)
        if args and isinstance(args[0], torch.Tensor):
            named.setdefault("input_ids", args[0])
        ids = named.get("input_ids", named.get("inputs_embeds"))
        if isinstance(ids, torch.Tensor) and ids.dim() >= 2 and ids.shape[1] > 1:
            for name, value in named.items():
                dim = _sequence_dim(name, value) if isinstance(value, torch.Tensor) else None
                if dim is not None:
                    torch._dynamo.maybe_mark_dynamic(value, dim)
            return self.compiled(*args, **kwargs)
        if self.replay is not None:
            result = self.replay.run(args, kwargs)
            if result is not None:
                self.replayed += 1
                return result
        if args:
            return self.compiled(*args, **kwargs)
        result, recorded = self.recorder.record(self.compiled, kwargs)
        if recorded is not None and recorded.same_as(self.recorded):
            self.replay = recorded
        self.recorded = recorded
        return result


def compile(model: torch.nn.Module, recipe=None, *, stats=None, artifact=None, kernels: str = "fast",
            debug=None, max_cache_len: int | None = None, lm_head: str = "int8", compiler: str = "inductor"
            ) -> torch.nn.Module:
    """``model`` with its forward compiled by the qcompiler backend and a ``generate()`` that runs the
    quantized graphs (see the module docstring). ``recipe``/``stats``/``artifact``/``kernels``/``debug``
    are the backend's options; the statistics or artifact folder is loaded (and checked) now.
    ``max_cache_len``: positions of the preallocated KV cache (default: the model's context, at most
    1024); a prompt plus its new tokens must fit in it. ``lm_head``: "int8" (default) quantizes the LM
    head of a recipe that keeps it float to int8 weights per channel, float activations
    (:func:`qcompiler.config.with_int8_lm_head`: lossless on SmolLM2, a quarter of the bytes of the
    largest layer of a decode step; GPTQ/AWQ/HQQ recipes keep theirs); "recipe" leaves the recipe as it
    is. An artifact is used as saved. ``compiler``: "inductor" (default) or "eager" (the quantized graphs run
    op by op: no Inductor compile, quicker to start, not qcompiler's speed; see BackendOptions)."""
    if artifact is not None and (recipe is not None or stats is not None):
        raise ConfigError("an artifact brings its own recipe and statistics: do not pass recipe or stats with it")
    if lm_head not in ("int8", "recipe"):
        raise ConfigError(f"lm_head must be 'int8' or 'recipe', got {lm_head!r}")
    if artifact is None:
        recipe = resolve_recipe(recipe)
        recipe = with_int8_lm_head(recipe) if lm_head == "int8" else recipe
    options = BackendOptions(**({"recipe": recipe} if recipe is not None else {}), kernels=kernels, stats=stats,
                             debug=debug, artifact=artifact, compiler=compiler)
    resolved = backend.resolve(options)  # load and check the folders now, before anything is compiled
    options = BackendOptions(recipe=resolved.recipe, kernels=kernels, stats=resolved.stats, debug=debug,
                             artifact=resolved.artifact, compiler=compiler)
    max_cache_len = resolve_max_cache_len(model, max_cache_len)
    return with_static_generate(model, CompiledForward(model.forward, options), max_cache_len)


def resolve_max_cache_len(model: torch.nn.Module, max_cache_len: int | None) -> int:
    """The KV cache length :func:`compile` gives ``model``: ``max_cache_len`` checked against the model's
    context, or by default the context, at most 1024."""
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_cache_len is None:
        return min(context or DEFAULT_MAX_CACHE_LEN, DEFAULT_MAX_CACHE_LEN)
    if not isinstance(max_cache_len, int) or isinstance(max_cache_len, bool) or max_cache_len < 2:
        raise ConfigError(f"max_cache_len must be an int of at least 2 positions, got {max_cache_len!r}")
    if context is not None and max_cache_len > context:
        raise ConfigError(f"max_cache_len={max_cache_len} is more than the model's context of {context} positions")
    return max_cache_len


def with_static_generate(model: torch.nn.Module, forward, max_cache_len: int) -> torch.nn.Module:
    """A shallow copy of ``model`` (sharing its modules and parameters; ``model`` keeps its own forward)
    with ``forward`` and a checked ``generate()`` on a static KV cache of ``max_cache_len`` positions."""
    copied = copy.copy(model)
    copied.__class__ = with_decode_loop(type(model))  # Hugging Face's greedy/sampling loop, leaner steps
    copied.decode_loop = DecodeLoopStats()
    copied.forward = forward
    copied.generate = _Generate(copied, type(model), max_cache_len)
    return copied


class _Generate:
    """``generate()`` of a model from :func:`compile`: Hugging Face's, checked first, on a static cache."""

    def __init__(self, model: torch.nn.Module, cls: type, max_cache_len: int) -> None:
        self.model, self.cls, self.max_cache_len = model, cls, max_cache_len

    def check(self, ids, max_new_tokens) -> None:
        """Raise a :class:`ConfigError` saying what to do if ``generate(ids, max_new_tokens=...)`` can not run."""
        check_generation(self.model, ids, max_new_tokens, self.max_cache_len)

    def __call__(self, inputs: torch.Tensor | None = None, **kwargs):
        model = self.model
        self.check(kwargs.get("input_ids", inputs),
                   kwargs.get("max_new_tokens", getattr(getattr(model, "generation_config", None), "max_new_tokens", None)))
        if "cache" not in kwargs and "past_key_values" not in kwargs:
            # a fresh one per call: a reused (reset) cache is already initialized, and the prompt's graph,
            # traced on an empty one, would not serve it
            from transformers import StaticCache

            kwargs["cache"] = StaticCache(config=model.config, max_cache_len=self.max_cache_len)
        kwargs.setdefault("disable_compile", True)  # HF's own torch.compile of the forward would re-trace in float
        return self.cls.generate(model, inputs, **kwargs)


def _check_prompt(ids) -> int:
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ConfigError("generate() takes input ids as a [batch, length] tensor (tokenizer(..., return_tensors='pt'))")
    if ids.shape[1] == 0 or ids.shape[0] == 0:
        raise ConfigError("the prompt is empty: give at least one token (an empty string tokenizes to nothing "
                          "unless the tokenizer adds a BOS token)")
    return int(ids.shape[1])


def check_generation(model: torch.nn.Module, ids, max_new_tokens, max_cache_len: int) -> None:
    """Raise a :class:`ConfigError` saying what to do if ``model`` can not generate ``max_new_tokens``
    after ``ids`` in a KV cache of ``max_cache_len`` positions."""
    if not (hasattr(model, "can_generate") and model.can_generate()):
        raise ConfigError(
            f"{type(model).__name__} has no generation head (it is not a causal language model): "
            "qcompiler.compile gives it a quantized forward, but generate() needs a model such as "
            "LlamaForCausalLM; call the returned model directly instead")
    prompt = _check_prompt(ids)
    if max_new_tokens is None:
        raise ConfigError("give max_new_tokens (how many tokens to generate): the cache is sized by it")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if prompt + max_new_tokens > max_cache_len:
        raise ConfigError(
            f"the prompt has {prompt} tokens and {max_new_tokens} more are asked for: "
            f"{prompt + max_new_tokens} positions, but the KV cache holds {max_cache_len}; shorten the "
            "prompt, ask for fewer tokens, or compile with a larger max_cache_len")
