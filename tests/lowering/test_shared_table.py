"""A token embedding tied to a quantized LM head reads the head's quantized weight, stored once: the row
gathers read each kernel layout exactly (ATen's CPU int4 tiles, rows of nibbles, the int8 kernels'
integers), the lowered graph holds no second copy, the bits count it once; a head on another scheme, or in a
tile layout the gather does not read, leaves the table its own copy."""

import pytest
import torch
from graphs import capture_graph, decode_step
from hypothesis import given, settings
from hypothesis import strategies as st

import qcompiler
from qcompiler import pipeline
from qcompiler.config import Recipe, WeightScheme
from qcompiler.lowering import embedding
from qcompiler.lowering.int4 import INT4_GEMV_KERNEL
from qcompiler.lowering.kernels import cpu, native, reference
from qcompiler.passes.weight_rounding import round_to_nearest
from qcompiler.report import CompileReport
from qcompiler.tools import models
from qcompiler.tools.model_bits import model_bits

needs_cpu_int4 = pytest.mark.skipif(not cpu.int4_available(), reason="no ATen CPU int4 kernel in this torch")
X86 = bool({"avx2", "avx512f"} & cpu.cpu_flags())  # ATen's x86 builds: whole tiles of 64 rows, split nibbles


def _w4(symmetric: bool, group: int = 32) -> WeightScheme:
    return WeightScheme(bits=4, granularity="per_group", group_size=group, symmetric=symmetric)


def _recipe(head: WeightScheme, table: WeightScheme) -> Recipe:
    return Recipe(name="tied", weight=head, activation=None, skip=("model.*",), embedding=table)


@st.composite
def tables(draw, groups=(16, 32, 64), row_step=16):
    group = draw(st.sampled_from(groups))
    dim = group * draw(st.integers(1, 3))
    rows = row_step * draw(st.integers(1, 9))  # by 16: tails of 16, 32 and 48 rows after whole tiles of 64
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    codes = torch.randint(0, 16, (rows, dim), generator=gen)
    scale = torch.rand(rows, dim // group, generator=gen) + 0.01
    zero = torch.randint(0, 16, (rows, dim // group), generator=gen).float()
    return codes, scale, zero, group


@needs_cpu_int4
@settings(max_examples=30, deadline=None)
@given(tables(groups=(32, 64)))  # the groups the CPU kernel takes
def test_rows_gathered_from_the_cpu_int4_layout_are_the_kernels_weights(problem):
    codes, scale, zero, group = problem
    rows, dim = codes.shape
    packed, scale_zeros = cpu.pack_int4_for_cpu(codes, scale, zero)
    layout = embedding.int4pack_block(codes, packed)
    if rows % 64 == 0 and X86:
        assert layout is not None  # whole tiles: the layout this CPU's kernel uses is found
    if layout is None:
        return  # a layout the gather does not read: the table keeps its own copy (tested below)
    ids = torch.arange(rows).flip(0).reshape(-1, 16)
    got = embedding.rows_from_int4pack(ids, packed, scale_zeros, torch.arange(dim), block=layout[0], group=group,
                                       dim=dim, dtype=torch.float32, adjacent=layout[1])
    sz = scale_zeros.float()
    expected = ((codes.float() - 8).unflatten(1, (-1, group)) * sz[:, :, 0].t().unsqueeze(-1)
                + sz[:, :, 1].t().unsqueeze(-1)).flatten(1)
    torch.testing.assert_close(got, expected[ids], rtol=0, atol=0)
    # and that is what the kernel multiplies by: the identity times the packed weight is its transpose
    kernel = cpu.int4_gemm(torch.eye(dim), packed, scale_zeros, group).t()
    torch.testing.assert_close(got.reshape(rows, dim), kernel[ids.reshape(-1)], rtol=2**-7, atol=1e-6)


@given(tables())
@settings(max_examples=20, deadline=None)
def test_rows_gathered_from_nibbles_are_the_reference_kernels_weights(problem):
    codes, scale, zero, group = problem
    dim = codes.shape[1]
    packed = reference.pack_int4(codes)
    ids = torch.tensor([[0, codes.shape[0] - 1, 3]])
    got = embedding.rows_from_linear(ids, packed, scale, zero, packed=True, group=group, dim=dim, rows=codes.shape[0],
                                     dtype=torch.float32)
    kernel = reference.int4_gemm(torch.eye(dim), packed, scale, zero, group).t()
    torch.testing.assert_close(got[0], kernel[ids[0]], rtol=1e-6, atol=1e-6)


@given(tables(row_step=reference.INT4_TILE))
@settings(max_examples=20, deadline=None)
def test_rows_gathered_from_the_tiled_gemv_layout_are_the_reference_kernels_weights(problem):
    codes, scale, zero, group = problem  # rows: whole tiles of 32
    rows, dim = codes.shape
    tiled, scale_t, zero_t = reference.pack_int4_tiled(codes, scale, zero)
    assert torch.equal(reference.unpack_int4_tiled(tiled), codes.to(torch.uint8))
    ids = torch.tensor([[0, rows - 1, 3 % rows], [rows // 2, 1 % rows, 0]])
    got = embedding.rows_from_tiled(ids, tiled, scale_t, zero_t, group=group, dim=dim, dtype=torch.float32)
    kernel = reference.int4_gemm(torch.eye(dim), reference.pack_int4(codes), scale, zero, group).t()
    torch.testing.assert_close(got, kernel[ids], rtol=1e-6, atol=1e-6)


def _stories():
    model = models.load_model("stories260k").model
    assert model.model.embed_tokens.weight is model.lm_head.weight
    return model


def _lowered(model, recipe, ids):
    gm, inputs = capture_graph(model, input_ids=ids, use_cache=False)
    report = CompileReport(0, recipe.name, "fast")
    gm = pipeline.run(gm, pipeline.build(recipe, torch.device("cpu")), report)
    return gm, inputs, report


needs_x86_int4 = pytest.mark.skipif(not (cpu.int4_available() and X86), reason="not ATen's x86 int4 layout here")


@needs_x86_int4
@pytest.mark.parametrize("symmetric", [True, False])
def test_a_tied_table_reads_the_heads_stored_weight_and_counts_once(symmetric):
    model = _stories()
    ids = torch.randint(3, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    recipe = _recipe(_w4(symmetric), _w4(symmetric))
    gm, inputs, report = _lowered(model, recipe, ids)
    decisions = {d.module: d for d in report.quantized}
    table, head = decisions["model.embed_tokens"], decisions["lm_head"]
    assert table.shared_with == "lm_head" and "stored once" in table.reason
    assert not [n for n, _ in gm.named_buffers() if "_emb_" in n or n.endswith("_w_q")]  # no copy, no QDQ left
    weight = model.lm_head.weight
    # stored form: nibbles, a float32 scale and (asymmetric) a float32 zero point per group of 32 (the head); the
    # table alone would store fp16 ones
    assert head.weight_bytes == weight.numel() // 2 + 4 * (weight.numel() // 32) * (1 if symmetric else 2)
    assert table.weight_bytes == weight.numel() // 2 + 2 * (weight.numel() // 32) * (1 if symmetric else 2)
    assert table.kernel_bytes == 0  # in memory: nothing of its own; the head's bf16 scale and offset per group
    assert head.kernel_bytes == weight.numel() // 2 + 4 * (weight.numel() // 32)
    float_bits = sum(8 * p.numel() * p.element_size() for p in model.parameters())
    assert model_bits(model, report.layers) == float_bits - 8 * weight.numel() * 4 + 8 * head.weight_bytes
    # the lookup gives the head's dequantized weight rows, as the head's kernel holds them
    emb = next(n for n in gm.graph.nodes if embedding.DECISION in n.meta and n.meta[embedding.DECISION] is table)
    next(n for n in gm.graph.nodes if n.op == "output").args = ((emb,),)
    gm.recompile()
    with torch.inference_mode():
        rows = gm(*inputs)[0]
    packed = gm.get_buffer(next(n for n, _ in gm.named_buffers() if n.endswith("_w4_cpu")))
    sz = gm.get_buffer(next(n for n, _ in gm.named_buffers() if n.endswith("_w4_scale_zeros")))
    kernel = cpu.int4_gemm(torch.eye(weight.shape[1]), packed, sz, 32).t()
    torch.testing.assert_close(rows.reshape(-1, weight.shape[1]), kernel[ids.reshape(-1)], rtol=2**-7, atol=1e-6)


@needs_x86_int4
def test_the_shared_model_computes_what_its_qdq_graph_computes():
    model = _stories()
    ids = {"input_ids": torch.randint(3, 512, (1, 16), generator=torch.Generator().manual_seed(1)), "use_cache": False}
    recipe = _recipe(_w4(False), _w4(False))
    outputs = {}
    for kernels in ("reference", "fast"):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="qcompiler", options={"recipe": recipe, "kernels": kernels})
        with torch.inference_mode():
            outputs[kernels] = compiled(**ids).logits
        decisions = {d.module: d for d in qcompiler.last_report().quantized}
        assert decisions["model.embed_tokens"].shared_with == "lm_head"
    # the CPU int4 kernel computes in bf16 (as without sharing): a few bf16 ulps of the logits' scale
    assert (outputs["fast"] - outputs["reference"]).abs().max() < 0.02 * outputs["reference"].abs().max()


@pytest.mark.inductor
@pytest.mark.skipif(native.unavailable_reason() is not None, reason="the C++ GEMV kernels are not built here")
def test_a_decode_step_gathers_from_the_gemv_layout():
    model = _stories()
    recipe = _recipe(_w4(True), _w4(True))
    fast, report = decode_step(model, recipe, "fast")
    ref, _ = decode_step(model, recipe, "reference")
    assert report.kernel_of["lm_head"][0] == INT4_GEMV_KERNEL  # the head on rows of nibbles
    table = next(d for d in report.quantized if d.module == "model.embed_tokens")
    assert table.shared_with == "lm_head"
    assert (fast - ref).abs().max() < 0.02 * ref.abs().max()


def test_an_int8_head_shares_too_and_another_scheme_does_not():
    model = _stories()
    ids = torch.randint(3, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    int8 = WeightScheme(bits=8)
    gm, inputs, report = _lowered(model, _recipe(int8, int8), ids)
    table = next(d for d in report.quantized if d.module == "model.embed_tokens")
    assert table.shared_with == "lm_head"
    assert table.weight_bytes == model.lm_head.weight.numel() + 2 * model.lm_head.weight.shape[0]  # its own: fp16 scales
    assert not [n for n, _ in gm.named_buffers() if "_emb_" in n]
    # the rows are the head's int8 integers times its scales (what its kernel multiplies by)
    emb = next(n for n in gm.graph.nodes if embedding.DECISION in n.meta and n.meta[embedding.DECISION] is table)
    next(n for n in gm.graph.nodes if n.op == "output").args = ((emb,),)
    gm.recompile()
    with torch.inference_mode():
        rows = gm(*inputs)[0].reshape(-1, model.lm_head.weight.shape[1])
    qw = round_to_nearest(model.lm_head.weight.detach(), int8)
    torch.testing.assert_close(rows, qw.dequantize(torch.float32)[ids.reshape(-1)], rtol=1e-6, atol=1e-7)
    _, _, report = _lowered(model, _recipe(_w4(True), _w4(False)), ids)
    table = next(d for d in report.quantized if d.module == "model.embed_tokens")
    assert table.shared_with == "" and table.reason == ""


@needs_cpu_int4
def test_a_cpu_int4_tile_layout_the_gather_does_not_read_leaves_an_own_copy():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # 80 rows: a tile of 64 and a tail of 16, laid out otherwise
    cfg = LlamaConfig(vocab_size=80, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 80, (1, 12), generator=torch.Generator().manual_seed(0))
    gm, inputs, report = _lowered(model, _recipe(_w4(True), _w4(True)), ids)
    table = next(d for d in report.quantized if d.module == "model.embed_tokens")
    head = next(d for d in report.quantized if d.module == "lm_head")
    if "ATen CPU int4" not in report.kernel_of["lm_head"][0]:
        pytest.skip(f"lm_head is not on ATen's CPU int4 kernel here: {report.kernel_of['lm_head']}")
    codes = torch.randint(0, 16, (80, 64))
    if embedding.int4pack_block(codes, cpu.pack_int4_for_cpu(codes, torch.ones(80, 2), torch.zeros(80, 2))[0]):
        pytest.skip("this CPU's int4 layout for 80 rows is one the gather reads")
    assert table.shared_with == "" and "keeps its own copy" in table.reason
    assert [n for n, _ in gm.named_buffers() if "_emb_" in n]
    float_bits = sum(8 * p.numel() * p.element_size() for p in model.parameters())
    weight = model.lm_head.weight
    assert model_bits(model, report.layers) == (float_bits - 8 * weight.numel() * 4 + 8 * head.weight_bytes
                                                + 8 * table.weight_bytes)
