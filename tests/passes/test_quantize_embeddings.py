"""Quantized embedding tables (``Recipe(embedding=...)``): the QDQ form is round-to-nearest with fp16
scales, the lowered row gather computes what it computes, the stored bytes are counted, a table the
scheme does not fit stays float with the reason, a tied LM head is counted once, and export refuses."""

import json
from dataclasses import replace

import pytest
import torch

import qcompiler
from qcompiler.config import Recipe, WeightScheme, recipe_from_json, recipe_to_json
from qcompiler.core.errors import ConfigError, ExportError
from qcompiler.lowering.embedding import KERNEL
from qcompiler.passes.weight_rounding import round_to_nearest
from qcompiler.tools import models
from qcompiler.tools.export.build import refuse_transforms
from qcompiler.tools.model_bits import model_bits
from tests.graphs import tiny_bert, tiny_llama

SCHEMES = {
    "int8-row-sym": WeightScheme(bits=8),
    "int8-g16-asym": WeightScheme(bits=8, granularity="per_group", group_size=16, symmetric=False),
    "int4-g32-asym": WeightScheme(bits=4, granularity="per_group", group_size=32, symmetric=False),
    "int4-g32-sym": WeightScheme(bits=4, granularity="per_group", group_size=32),
    "int3-row-asym": WeightScheme(bits=3, symmetric=False),
}


def _run(model, recipe, inputs, kernels):
    torch._dynamo.reset()
    qcompiler.clear_reports()
    compiled = torch.compile(model, backend="qcompiler", options={"recipe": recipe, "kernels": kernels})
    with torch.inference_mode():
        out = compiled(**inputs)
    out = out.logits if hasattr(out, "logits") else out.last_hidden_state
    return out, qcompiler.last_report()


def _stored_bytes(table: torch.Tensor, scheme: WeightScheme, kernel: bool = False) -> int:
    """The stored form (integers packed at their bits) or, ``kernel``, the lowering's (two per byte up to 4 bits)."""
    rows, dim = table.shape
    group = dim if scheme.granularity == "per_channel" else scheme.group_size
    if kernel:
        codes = rows * dim // 2 if scheme.bits <= 4 else rows * dim
    else:
        codes = (rows * dim * scheme.bits + 7) // 8
    per_block = 2 if scheme.symmetric else 4  # an fp16 scale, and an fp16 offset when asymmetric
    return codes + rows * (dim // group) * per_block


@pytest.mark.parametrize("name", [pytest.param("int8-row-sym", marks=pytest.mark.inductor), *list(SCHEMES)[1:]])
@pytest.mark.parametrize("make", [tiny_llama, tiny_bert])
def test_the_row_gather_computes_what_the_qdq_graph_computes(make, name):
    model, scheme = make(), SCHEMES[name]
    inputs = {"input_ids": torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))}
    recipe = Recipe(name="emb", skip=("*",), embedding=scheme)  # the tables alone: every linear float
    reference, ref_report = _run(model, recipe, inputs, "reference")
    fast, report = _run(model, recipe, inputs, "fast")
    torch.testing.assert_close(fast, reference, rtol=1e-6, atol=1e-6)
    tables = {n: m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding)}
    decisions = {d.module: d for d in report.quantized}
    assert set(decisions) == set(tables)
    for module, table in tables.items():
        assert decisions[module].weight_bytes == _stored_bytes(table, scheme)
        assert decisions[module].kernel_bytes == _stored_bytes(table, scheme, kernel=True)
        assert report.kernel_of[module][0] == KERNEL
    # the QDQ graph is the model with each table replaced by its round-to-nearest copy (fp16 scales)
    with torch.no_grad():
        saved = {m: t.clone() for m, t in tables.items()}
        for m, t in tables.items():
            qw = round_to_nearest(t, replace(scheme, fp16_scales=True))
            assert torch.equal(qw.scale, qw.scale.half().float())
            t.copy_(qw.dequantize(t.dtype))
        direct = model(**inputs)
        direct = direct.logits if hasattr(direct, "logits") else direct.last_hidden_state
        for m, t in tables.items():
            t.copy_(saved[m])
    torch.testing.assert_close(reference, direct, rtol=1e-5, atol=1e-5)
    assert [d.module for d in ref_report.quantized] == [d.module for d in report.quantized]


def test_a_table_the_scheme_does_not_fit_stays_float_with_the_reason():
    model = tiny_llama()  # 64 wide: a group of 48 does not divide it (fit_group off)
    recipe = Recipe(name="emb", embedding=WeightScheme(bits=4, granularity="per_group", group_size=48))
    _, report = _run(model, recipe, {"input_ids": torch.tensor([[1, 2, 3]])}, "fast")
    table = next(d for d in report.layers if d.module == "model.embed_tokens")
    assert not table.quantized and "not a multiple of group_size 48" in table.reason


def test_recipe_embedding_validation_and_json():
    with pytest.raises(ConfigError, match="per row .* not per tensor"):
        Recipe(embedding=WeightScheme(granularity="per_tensor"))
    with pytest.raises(ConfigError, match="full_range"):
        Recipe(embedding=WeightScheme(bits=4, granularity="per_group", group_size=32, full_range=True))
    with pytest.raises(TypeError, match="Recipe.embedding must be a WeightScheme"):
        Recipe(embedding="int8")
    recipe = Recipe(name="x", embedding=SCHEMES["int4-g32-asym"])
    assert recipe_from_json(json.loads(json.dumps(recipe_to_json(recipe)))) == recipe
    with pytest.raises(ExportError, match="quantized embedding tables"):
        refuse_transforms(recipe)


def test_a_tied_table_is_saved_only_when_the_embedding_and_the_head_are_both_quantized():
    """stories260K's LM head is tied to its token embedding: quantizing one of them adds a copy beside the
    float table; quantizing both drops the float table, and the table reads the head's quantized weight
    (the same scheme: stored once)."""
    model = models.load_model("stories260k").model
    ids = {"input_ids": torch.randint(3, 512, (1, 16), generator=torch.Generator().manual_seed(0)), "use_cache": False}
    table = model.model.embed_tokens.weight
    assert table is model.lm_head.weight
    float_bits = sum(8 * p.numel() * p.element_size() for p in model.parameters())
    emb = SCHEMES["int8-row-sym"]
    head_int8 = Recipe(name="head", weight=WeightScheme(bits=8), activation=None, skip=("model.*",))
    _, only_table = _run(model, Recipe(name="t", skip=("*",), embedding=emb), ids, "fast")
    _, only_head = _run(model, head_int8, ids, "fast")
    _, both = _run(model, replace(head_int8, embedding=emb), ids, "fast")
    def copies(report):
        return sum(8 * d.weight_bytes for d in report.quantized if not d.shared_with)

    table_bits = 8 * table.numel() * table.element_size()
    assert model_bits(model, only_table.layers) == float_bits + copies(only_table)
    assert model_bits(model, only_head.layers) == float_bits + copies(only_head)
    assert model_bits(model, both.layers) == float_bits - table_bits + copies(both)
    assert sorted(d.module for d in both.quantized) == ["lm_head", "model.embed_tokens"]
    assert [d.shared_with for d in both.quantized if d.module == "model.embed_tokens"] == ["lm_head"]
    assert copies(both) == copies(only_head)
