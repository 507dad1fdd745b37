"""qcompiler.compile(model).generate()'s decode loop gives what Hugging Face's own loop gives."""

import pytest
import torch

import qcompiler
from qcompiler.tools import decode_loop, models


@pytest.fixture(scope="module")
def stories():
    return models.load_model("stories260k")


@pytest.fixture(scope="module")
def quantized(stories):
    torch._dynamo.reset()
    return qcompiler.compile(stories.model, "w8a8-dynamic", max_cache_len=96, compiler="eager")


def _prompt(loaded, text="Once upon a time, there was a little"):
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor([[loaded.tokenizer.bos_token_id] + ids])


class _Pieces:
    """A streamer that keeps what it is given."""

    def __init__(self):
        self.pieces = []
        self.ended = False

    def put(self, value):
        self.pieces.append(value.clone())

    def end(self):
        self.ended = True


def _both(quantized, monkeypatch, **kwargs):
    """generate(**kwargs) through this loop and through Hugging Face's (the same seed), with their streamers."""
    results = {}
    for loop in ("ours", "hugging face"):
        with monkeypatch.context() as patch:
            if loop == "hugging face":
                patch.setattr(decode_loop, "_unsupported", lambda *args: "forced by the test")
            streamer = _Pieces()
            torch.manual_seed(7)
            with torch.inference_mode():
                out = quantized.generate(**kwargs, streamer=streamer)
            results[loop] = (out, streamer, quantized.decode_loop.fallback)
    assert results["hugging face"][2] == "forced by the test"
    return results


def test_greedy_and_sampled_tokens_and_streamed_pieces_are_hugging_faces(quantized, stories, monkeypatch):
    ids = _prompt(stories)
    for options in ({"do_sample": False}, {"do_sample": True, "temperature": 0.9, "top_k": 30, "top_p": 0.9}):
        before = quantized.decode_loop.fast_steps
        results = _both(quantized, monkeypatch, input_ids=ids, max_new_tokens=40, eos_token_id=None, **options)
        (ours, ours_streamer, fallback), (theirs, their_streamer, _) = results["ours"], results["hugging face"]
        assert fallback is None
        # 40 tokens: the prompt's forward gives the first, 39 decode steps; Hugging Face prepares two of them
        assert quantized.decode_loop.fast_steps - before == 37
        assert torch.equal(ours, theirs) and ours.shape[1] == ids.shape[1] + 40
        assert len(ours_streamer.pieces) == len(their_streamer.pieces) == 41 and ours_streamer.ended
        assert all(torch.equal(a, b) for a, b in zip(ours_streamer.pieces, their_streamer.pieces, strict=True))


def test_a_padded_batch_that_stops_at_an_end_token_is_hugging_faces(quantized, stories, monkeypatch):
    tok = stories.tokenizer
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    batch = tok(["Once upon a time", "The little dog ran to the big park and"], return_tensors="pt", padding=True,
                add_special_tokens=False)
    assert not bool(batch["attention_mask"].all())  # the first row is padded
    # make a token the first row generates early its end token: that row finishes, the other goes on
    with torch.inference_mode():
        free = quantized.generate(**batch, max_new_tokens=12, do_sample=False, eos_token_id=None)
    stop = int(free[0, batch["input_ids"].shape[1] + 2])
    results = _both(quantized, monkeypatch, **batch, max_new_tokens=12, do_sample=False, eos_token_id=stop,
                    pad_token_id=tok.pad_token_id)
    ours, theirs = results["ours"][0], results["hugging face"][0]
    assert results["ours"][2] is None
    assert torch.equal(ours, theirs)
    assert int(ours[0, -1]) == tok.pad_token_id  # the finished row was padded, as Hugging Face pads it


def test_outputs_it_does_not_build_run_hugging_faces_loop(quantized, stories):
    ids = _prompt(stories)
    with torch.inference_mode():
        out = quantized.generate(ids, max_new_tokens=5, do_sample=False, return_dict_in_generate=True,
                                 output_scores=True)
    assert quantized.decode_loop.fallback == "return_dict_in_generate"
    assert len(out.scores) == 5 and out.sequences.shape[1] == ids.shape[1] + 5


def test_when_its_inputs_differ_from_hugging_faces_hugging_face_prepares_every_step(quantized, stories, monkeypatch):
    ids = _prompt(stories)
    with torch.inference_mode():
        expected = quantized.generate(ids, max_new_tokens=12, do_sample=False)
    wrong = decode_loop._StepInputs._build

    def every_position_visible(self, input_ids, next_tokens):
        inputs = wrong(self, input_ids, next_tokens)
        inputs["attention_mask"] = torch.ones_like(inputs["attention_mask"])
        return inputs

    monkeypatch.setattr(decode_loop._StepInputs, "_build", every_position_visible)
    before = quantized.decode_loop.fast_steps
    with torch.inference_mode():
        out = quantized.generate(ids, max_new_tokens=12, do_sample=False)
    assert "not those Hugging Face prepares" in quantized.decode_loop.fallback
    assert quantized.decode_loop.fast_steps == before
    assert torch.equal(out, expected)


def test_sliding_windows_and_other_caches_are_not_for_this_loop(stories):
    from transformers import DynamicCache, GenerationConfig

    config = GenerationConfig()
    model = stories.model
    assert decode_loop._unsupported(model, config, False, {"cache": DynamicCache()}) == "no static cache"
    assert decode_loop._unsupported(model, config, True, {}) == "synced_gpus"

    class Sliding:
        sliding_window = 256
        is_encoder_decoder = False

    assert decode_loop._sliding(Sliding())
    assert not decode_loop._sliding(model.config)


def test_the_model_copy_is_still_the_models_class(quantized, stories):
    cls = type(stories.model)
    assert isinstance(quantized, cls) and type(quantized).__name__ == cls.__name__
    assert type(stories.model) is cls and not hasattr(stories.model, "decode_loop")  # the user's model is untouched
    assert quantized.can_generate()


def test_an_a_b_of_decode_steps_times_each_way_and_checks_they_made_the_same_text(quantized, stories, monkeypatch):
    from qcompiler.core.errors import ConfigError
    from qcompiler.tools import chat

    ids = _prompt(stories)
    switched = []
    ways = {name: (lambda name=name: switched.append(name)) for name in ("a", "b")}
    times = chat.alternate_decode_steps(quantized, stories, ids, ways, repeats=2, new=4)
    assert switched == ["a", "b", "a", "b"] and all(len(v) == 2 and min(v) > 0 for v in times.values())
    # a way that changes the tokens (the greedy choice replaced by the runner-up) is refused
    def other_tokens():
        monkeypatch.setattr(decode_loop, "_greedy", lambda scores: scores.topk(2, dim=-1).indices[..., 1])

    with pytest.raises(ConfigError, match="different text"):
        chat.alternate_decode_steps(quantized, stories, ids, {"a": lambda: None, "b": other_tokens}, repeats=1, new=4)


def test_the_greedy_choice_is_argmax_by_the_kernel_where_it_applies(monkeypatch):
    from qcompiler.lowering.kernels import native

    if native.unavailable_reason() is not None:
        pytest.skip(native.unavailable_reason())
    asked = []
    real = native.direct
    monkeypatch.setattr(native, "direct", lambda op, build=True: asked.append(op) or real(op, build))
    scores = torch.randn(3, 700)
    scores[1, 5] = scores[1, 9] = 50.0  # a tie: the first one
    assert torch.equal(decode_loop._greedy(scores), torch.argmax(scores, dim=-1)) and asked == ["greedy_tokens"]
    for other in (scores.double(), scores.t().contiguous().t(), scores[0]):  # float64, strided columns, 1-D
        asked.clear()
        assert torch.equal(decode_loop._greedy(other), torch.argmax(other, dim=-1)) and asked == []
