"""The decode loop of :func:`qcompiler.compile`'s ``generate()``: Hugging Face's greedy and sampling loop
(``GenerationMixin._sample``) without its per-step input preparation.

Every decode step of Hugging Face's loop rebuilds the model's inputs through general code: it slices and
clones the last token, grows the 2-D mask and the position ids, and builds the static cache's 4-D
attention mask through its masking functions. That is about 0.6 ms of Python per step on a 2-core host,
6% of a SmolLM2 step. On a static cache with full attention a step's inputs differ from the last step's
only in the token, one more visible cache position in the mask and the position ids one further. So
Hugging Face prepares the first two decode steps' inputs; if this loop builds the second step's the same
from the first's (same keys, tensors equal in dtype, shape, stride and values, every other input the same
object), it builds every later step's that way. The rest is Hugging Face's, in Hugging Face's order: the
prefill, the logits processors and warpers, the token choice (argmax, or a multinomial draw from the
softmax: the same random draws), padding of finished rows, the stopping criteria and the streamer.

Hugging Face's own loop runs instead where any of that may not hold; :class:`DecodeLoopStats` says why:
scores or other outputs asked for (``return_dict_in_generate``), ``synced_gpus``, assisted decoding,
encoder-decoder models, ``inputs_embeds`` or token type ids, no cache or a cache other than
a static one, sliding-window attention. Where the second step's check fails, Hugging Face prepares every
step's inputs.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from qcompiler.lowering.kernels import native
from qcompiler.tools.replay import input_spec

_CHUNK = 32  # decode steps whose masks and position ids are made at once

# inputs that change from step to step in Hugging Face's loop and that this loop does not build
_PER_STEP_KWARGS = ("inputs_embeds", "token_type_ids", "mm_token_type_ids", "moe_mm_token_type_ids")


@dataclasses.dataclass
class DecodeLoopStats:
    """What the last ``generate()`` calls of a model from :func:`qcompiler.compile` did: ``fast_steps``,
    decode steps whose inputs this loop built (over all calls); ``fallback``, why the last call did not
    (None when it did)."""

    fast_steps: int = 0
    fallback: str | None = None


class DecodeLoopMixin:
    """Mixed into the class of :func:`qcompiler.compile`'s model copy: its ``_sample`` is the loop above."""

    def _sample(self, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False,
                streamer=None, **model_kwargs):
        stats = self.decode_loop
        stats.fallback = _unsupported(self, generation_config, synced_gpus, model_kwargs)
        if stats.fallback is not None:
            return super()._sample(input_ids, logits_processor, stopping_criteria, generation_config,
                                   synced_gpus=synced_gpus, streamer=streamer, **model_kwargs)
        return _decode(self, input_ids, logits_processor, stopping_criteria, generation_config, streamer,
                       model_kwargs, stats)


@functools.cache
def with_decode_loop(cls: type) -> type:
    """``cls`` with :class:`DecodeLoopMixin`'s ``_sample`` (one class per model class, named as it is)."""
    return type(cls.__name__, (DecodeLoopMixin, cls), {"__module__": cls.__module__, "__qualname__": cls.__qualname__})


def _sliding(config) -> bool:
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    layer_types = getattr(config, "layer_types", None) or ()
    return getattr(config, "sliding_window", None) is not None or any(t != "full_attention" for t in layer_types)


def _unsupported(model, generation_config, synced_gpus, model_kwargs) -> str | None:
    """Why this loop can not run this ``generate()`` call (None if it can)."""
    from transformers import StaticCache

    if synced_gpus:
        return "synced_gpus"
    if generation_config.return_dict_in_generate:
        return "return_dict_in_generate"
    if getattr(generation_config, "is_assistant", False):
        return "assisted decoding"
    if model.config.is_encoder_decoder:
        return "an encoder-decoder model"
    if any(model_kwargs.get(key) is not None for key in _PER_STEP_KWARGS):
        return "inputs_embeds or token type ids"
    if not model_kwargs.get("use_cache", True) or not isinstance(model_kwargs.get("cache"), StaticCache):
        return "no static cache"
    if _sliding(model.config):
        return "sliding-window attention"
    mask = model_kwargs.get("attention_mask")
    if mask is not None and mask.dim() != 2:
        return "a custom attention mask"
    return None


def _greedy(scores: torch.Tensor) -> torch.Tensor:
    """``torch.argmax(scores, dim=-1)`` (the same tokens, ties and NaN included), by the C++ kernel where it
    applies (float32 CPU rows, a tenth of argmax's time over a 49152-word vocabulary) and is built already (the
    CPU decode graphs build it)."""
    fits = scores.device.type == "cpu" and scores.dtype == torch.float32 and scores.dim() == 2 \
        and scores.shape[1] > 0 and scores.stride(1) == 1
    greedy = native.direct("greedy_tokens", build=False) if fits else None  # (no build inside a decode loop)
    return torch.argmax(scores, dim=-1) if greedy is None else greedy(scores)


class _StepInputs:
    """Each decode step's model inputs. The first two come from Hugging Face; if this class builds the second
    step's inputs the same from the first's (the token, the mask, the position ids one further, all else the
    same objects), it builds every later step's."""

    def __init__(self, model, model_kwargs: dict) -> None:
        self.model, self.model_kwargs = model, model_kwargs
        self.last: dict | None = None  # the last step's inputs
        self.prepared = 0  # steps whose inputs Hugging Face prepared
        self.built = 0  # steps whose inputs this class built
        self.fast = False
        self.buildable = False

    def next(self, input_ids: torch.Tensor, next_tokens: torch.Tensor) -> dict:
        """The inputs of the step that feeds ``next_tokens``, the last column of ``input_ids``."""
        if self.fast:
            self.built += 1
            self.last = self._build(input_ids, next_tokens)
            return self.last
        inputs = self.model.prepare_inputs_for_generation(input_ids, next_sequence_length=1, **self.model_kwargs)
        self.prepared += 1
        if self.prepared == 1:
            self.buildable = self._setup(inputs, input_ids)
        elif self.prepared == 2 and self.buildable:
            self.fast = _same_inputs(self._build(input_ids, next_tokens), inputs)
        self.last = inputs
        return inputs

    def after(self, outputs) -> None:
        """After a step's forward: Hugging Face's update of its 2-D mask and position ids (while it prepares the inputs)."""
        if not self.fast:
            self.model_kwargs = self.model._update_model_kwargs_for_generation(outputs, self.model_kwargs)

    def _setup(self, inputs: dict, input_ids: torch.Tensor) -> bool:
        """The padding of the 2-D mask and the cache positions, from the first step's 4-D mask; False where
        the inputs have parts this class does not build."""
        mask = inputs.get("attention_mask")
        given = self.model_kwargs.get("attention_mask")
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 4 \
                or (given is not None and given.shape[1] > mask.shape[-1]) \
                or any(key in inputs for key in _PER_STEP_KWARGS):
            return False
        batch, length = input_ids.shape[0], mask.shape[-1]
        padding = torch.ones(batch, length, dtype=torch.bool, device=mask.device)
        if given is not None:
            padding[:, :given.shape[1]] = given.bool()
        self.padding = padding.view(1, batch, 1, 1, length)
        self.positions = torch.arange(length, device=mask.device).view(1, 1, 1, 1, length)
        self.chunk_start, self.masks, self.position_ids = 0, None, None
        return True

    def _build(self, input_ids: torch.Tensor, next_tokens: torch.Tensor) -> dict:
        """The step's inputs: the token (a view of ``next_tokens``), and the mask and position ids of the step
        as views into the next :data:`_CHUNK` steps' (made in one go: after a step's weight stream every
        small torch op between two graph calls costs 50-200 us, its code and data out of the caches)."""
        position = input_ids.shape[1] - 1
        index = position - self.chunk_start
        if self.masks is None or not 0 <= index < _CHUNK:
            self._make_chunk(position)
            index = 0
        inputs = dict(self.last)
        inputs["input_ids"] = next_tokens[:, None]
        inputs["attention_mask"] = self.masks[index]
        if self.position_ids is not None:
            inputs["position_ids"] = self.position_ids[index]
        return inputs

    def _make_chunk(self, position: int) -> None:
        """Masks and position ids of the steps at cache positions ``position`` .. ``position + _CHUNK - 1``."""
        ahead = torch.arange(_CHUNK, device=self.positions.device)
        self.masks = (self.positions <= (position + ahead).view(_CHUNK, 1, 1, 1, 1)) & self.padding
        last = self.last.get("position_ids")
        if last is not None:
            self.position_ids = last.unsqueeze(0) + (ahead + 1).view(_CHUNK, *[1] * last.dim()).to(last.dtype)
        self.chunk_start = position


def _same_inputs(ours: dict, theirs: dict) -> bool:
    if ours.keys() != theirs.keys():
        return False
    for key, value in theirs.items():
        mine = ours[key]
        if isinstance(value, torch.Tensor):
            # plain tensors only (the replay, replay.py, does not repeat a subclass's guards either)
            if type(value) is not torch.Tensor or type(mine) is not torch.Tensor or input_spec(mine) != input_spec(value) \
                    or not torch.equal(mine, value):
                return False
        elif mine is not value and not (isinstance(value, (bool, int, float, str)) and mine == value):
            return False
    return True


def _decode(model, input_ids, logits_processor, stopping_criteria, generation_config, streamer, model_kwargs,
            stats: DecodeLoopStats):
    """Hugging Face's ``_sample`` for the calls :func:`_unsupported` lets through, inputs from :class:`_StepInputs`."""
    pad_token_id = generation_config._pad_token_tensor
    if pad_token_id is not None:
        pad_token_id = pad_token_id.to(input_ids.device)
    has_eos_stopping_criteria = any(hasattr(criteria, "eos_token_id") for criteria in stopping_criteria)
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    outputs = model._prefill(input_ids, generation_config, model_kwargs, is_first_iteration=True)
    model_kwargs = model._update_model_kwargs_for_generation(outputs, model_kwargs)
    steps = _StepInputs(model, model_kwargs)
    with model._optimize_model_for_decode():
        while True:
            logits = outputs.logits[:, -1]
            if logits.dtype != torch.float32 or logits.device != input_ids.device:
                logits = logits.to(dtype=torch.float32, device=input_ids.device)
            del outputs  # (Hugging Face copies the logits to drop the prompt's; a decode step's are the step's own)
            scores = logits_processor(input_ids, logits)
            if generation_config.do_sample:
                next_tokens = torch.multinomial(torch.nn.functional.softmax(scores, dim=-1), num_samples=1).squeeze(1)
            else:
                next_tokens = _greedy(scores)
            if has_eos_stopping_criteria:
                next_tokens = next_tokens * unfinished + pad_token_id * (1 - unfinished)
            input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
            unfinished = unfinished & ~stopping_criteria(input_ids, None)
            if streamer is not None:
                streamer.put(next_tokens.cpu())
            if unfinished.max() == 0:
                break
            inputs = steps.next(input_ids, next_tokens)
            outputs = model(**inputs, return_dict=True)
            steps.after(outputs)
    if streamer is not None:
        streamer.end()
    stats.fast_steps += steps.built
    if steps.prepared >= 2 and not steps.fast:
        stats.fallback = "the inputs this loop builds for a step are not those Hugging Face prepares"
    return input_ids
