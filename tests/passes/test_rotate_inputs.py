"""The rotation's fallback on graphs with no residual stream it can rotate (post-norm BERT): every quantized
linear's input through an online Hadamard transform, the float function kept (float64), the reason in the
report, less W8A8 error on an outlier model; ``Rotation(fallback=False)`` raises the reason instead."""

from dataclasses import replace

import pytest
import torch
from graphs import tiny_bert

import qcompiler
from qcompiler import Recipe, Rotation
from qcompiler.core import capture
from qcompiler.core.ir import LINEAR, ONLINE_HADAMARD
from qcompiler.passes.rotate import RotationError


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    qcompiler.clear_reports()


def _rotated_graph(model, ids, rotation):
    gm, calls = capture.capture(model, [capture.as_batch(ids)], what="test")
    capture.bind_parameters(gm, calls[0])
    rep = qcompiler.report.CompileReport(0, "", "")
    steps = qcompiler.pipeline.base_steps(Recipe(activation=None, rotation=rotation))
    return qcompiler.pipeline.run(gm, steps, rep), calls[0], rep


def test_a_post_norm_encoder_gets_its_linear_inputs_rotated_and_computes_the_same_function():
    model = tiny_bert().double()
    ids = torch.randint(0, 128, (2, 12))
    with torch.inference_mode():
        expected = model(ids).last_hidden_state
        gm, inputs, rep = _rotated_graph(model, ids, Rotation())
        got = gm(*inputs)
    got = next(t for t in torch.utils._pytree.tree_leaves(got) if isinstance(t, torch.Tensor) and t.shape == expected.shape)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    counts = {p.name: p.counts for p in rep.passes}["rotate"]
    # q, k, v, attention output, up, down in each of 2 layers, and the pooler
    assert counts["online"] == 13 and counts["unrotated"] == 0
    transforms = [n for n in gm.graph.nodes if ONLINE_HADAMARD in n.meta]
    assert len(transforms) == 9  # q, k and v share one: 4 per layer, and the pooler's
    readers = {u.meta[LINEAR].module.rsplit(".", 1)[-1] for n in transforms for u in n.users if LINEAR in u.meta}
    assert {"query", "key", "value"} <= readers
    why = rep.transforms["rotate"][0]
    # BERT's token, position and token-type embeddings: not a stream this pass rotates
    assert why.startswith("residual stream not rotated: ") and "found 3 embeddings" in why, why


def test_fallback_false_raises_the_reason_and_changes_nothing():
    model = tiny_bert()
    ids = torch.randint(0, 128, (1, 8))
    with pytest.raises(RotationError, match="found 3 embeddings"):
        _rotated_graph(model, ids, Rotation(fallback=False))
    with pytest.raises(ValueError, match="Rotation.fallback"):
        Rotation(fallback="yes")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_fallback_rotation_lowers_w8a8_error_on_an_outlier_encoder(seed):
    """A hidden channel 30x the rest after every LayerNorm (as in trained encoders), the linears' weights 5x
    their initialization (so that they, not the residual, carry the output): per-token W8A8 with its inputs
    rotated is closer to float on each of three random models, every linear still on the integer kernels."""
    model = tiny_bert(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(5)
            if isinstance(module, torch.nn.LayerNorm):
                module.weight[7] *= 30
                module.bias[7] += 5
    ids = torch.randint(0, 128, (2, 16))
    base = qcompiler.PRESETS["w8a8-dynamic"]
    errors = {}
    with torch.inference_mode():
        ref = model(ids).last_hidden_state
        for name, recipe in (("plain", base), ("rotated", replace(base, name="rotated", rotation=Rotation()))):
            torch._dynamo.reset()
            qcompiler.clear_reports()
            out = torch.compile(model, backend="qcompiler", options={"recipe": recipe})(ids).last_hidden_state
            errors[name] = float((out - ref).pow(2).mean())
            rep = qcompiler.last_report()
            assert {p.name: p.counts for p in rep.passes}["lower"]["lowered"] == len(rep.quantized) == 13
    assert errors["rotated"] < errors["plain"], errors
