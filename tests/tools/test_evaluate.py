"""evaluate() on stories260K (a real, tiny trained model): accuracy numbers, options passed through."""

import math

import pytest
import torch

import qcompiler
from qcompiler.calibration.calibrate import text_batches
from qcompiler.config import BackendOptions
from qcompiler.core.errors import ConfigError
from qcompiler.tools import evaluate, models


@pytest.fixture(scope="module")
def stories():
    return models.load_model("stories260k")


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()


CFG = evaluate.EvalConfig(tokens=1024, window=128, speed=False, progress=False)


def test_dynamic_eval_reports_accuracy_and_size(stories):
    result = evaluate.evaluate(stories, BackendOptions(), models.default_text(), CFG)
    f, q = result.float["perplexity"], result.quantized["perplexity"]
    assert math.isfinite(f) and math.isfinite(q) and abs(q / f - 1) < 0.05
    assert 0 <= result.quantized["kl"] < 0.05 and 0.8 < result.quantized["top1_agreement"] <= 1
    assert result.weight_bytes["quantized"] < result.weight_bytes["float"]
    assert result.layers["quantized"] == 35 and "BOS" in result.convention


def test_static_eval_uses_the_given_stats(stories):
    batches = text_batches(stories.tokenizer, models.default_calibration_text(), 4, 64, add_bos=True)
    assert all(b.shape == (1, 64) and b[0, 0] == stories.tokenizer.bos_token_id for b in batches)
    stats = qcompiler.calibrate(stories.model, batches, "w8a8-static", progress=False)
    options = BackendOptions(recipe="w8a8-static-mse", stats=stats)
    result = evaluate.evaluate(stories, options, models.default_text(), CFG)
    assert result.recipe == "w8a8-static-mse"
    assert abs(result.quantized["perplexity"] / result.float["perplexity"] - 1) < 0.1
    assert all("static mse" in d.scheme for r in qcompiler.reports() for d in r.quantized)


def test_the_api_refuses_token_counts_and_windows_below_their_least(stories):
    for limit in (-5, 0, 1.5, True):
        with pytest.raises(ConfigError, match="tokens to read must be an int of at least 1"):
            evaluate.read_tokens(models.default_text(), stories.tokenizer, limit)
    assert evaluate.read_tokens(models.default_text(), stories.tokenizer, 5).shape == (5,)
    for field, value in [("window", 0), ("window", 1), ("tokens", -5), ("speed_repeats", 0), ("passages", 0),
                         ("prefill_tokens", 0), ("decode_context", -1), ("window", 64.0)]:
        with pytest.raises(ConfigError, match=f"EvalConfig.{field} must be an int of at least"):
            evaluate.EvalConfig(**{field: value})
    short = evaluate.EvalConfig(tokens=100, window=128, speed=False, progress=False)
    with pytest.raises(ConfigError, match="100 tokens make no full window of 128"):
        evaluate.evaluate(stories, BackendOptions(), models.default_text(), short)
