"""4-bit weight-only lowering: the CPU int4 kernel against the reference, and the fuse pass on models."""

import pytest
import torch
from graphs import tiny_llama
from hypothesis import given
from hypothesis import strategies as st

import qcompiler
from qcompiler.config import Recipe, WeightScheme
from qcompiler.lowering import ops
from qcompiler.lowering.kernels import cpu, reference

needs_cpu_int4 = pytest.mark.skipif(not cpu.int4_available(), reason="no ATen CPU int4 kernel in this torch")


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    qcompiler.clear_reports()


def _bf16_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """How far bf16 activations and bf16 scales/offsets may move ``x @ w.T``: a few bf16 ulps of each
    product, summed (the accumulation itself is fp32)."""
    return 2.0**-6 * (x.abs().float() @ w.abs().t()) + 1e-5


@st.composite
def int4_problems(draw):
    group = draw(st.sampled_from([32, 64, 128]))
    k = group * draw(st.integers(1, 3))
    n = 16 * draw(st.integers(1, 3))  # the CPU kernel's tile
    m = draw(st.sampled_from([0, 1, 2, 7, 33]))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    w_int = torch.randint(0, 16, (n, k), generator=gen)
    if draw(st.booleans()):  # the extremes of the grid
        w_int[:, ::3] = 15
        w_int[:, 1::3] = 0
    scale = torch.rand(n, k // group, generator=gen) * draw(st.sampled_from([1e-3, 1.0, 50.0])) + 1e-4
    zero = torch.randint(0, 16, (n, k // group), generator=gen).float()
    x = torch.randn(m, k, generator=gen) * draw(st.sampled_from([1e-2, 1.0, 100.0]))
    return x, w_int, scale, zero, group


@needs_cpu_int4
@given(int4_problems())
def test_cpu_int4_kernel_matches_the_reference(problem):
    x, w_int, scale, zero, group = problem
    packed, scale_zeros = cpu.pack_int4_for_cpu(w_int, scale, zero)
    got = torch.ops.qcompiler.int4_gemm_cpu(x, packed, scale_zeros, group)
    expected = reference.int4_gemm(x, reference.pack_int4(w_int), scale, zero, group)
    w = ((w_int.float() - zero.repeat_interleave(group, 1)) * scale.repeat_interleave(group, 1))
    assert got.shape == expected.shape == (x.shape[0], w_int.shape[0])
    assert ((got - expected).abs() <= _bf16_bound(x, w)).all()


@needs_cpu_int4
def test_cpu_int4_kernel_keeps_leading_dims_and_dtype():
    w_int = torch.randint(0, 16, (32, 64))
    scale, zero = torch.rand(32, 2) + 0.1, torch.full((32, 2), 8.0)
    packed, scale_zeros = cpu.pack_int4_for_cpu(w_int, scale, zero)
    x = torch.randn(2, 3, 64)
    out = torch.ops.qcompiler.int4_gemm_cpu(x, packed, scale_zeros, 32)
    assert out.shape == (2, 3, 32) and out.dtype == torch.float32
    assert torch.ops.qcompiler.int4_gemm_cpu(x.bfloat16(), packed, scale_zeros, 32).dtype == torch.bfloat16


def test_int4_ops_check_their_inputs_and_pass_opcheck():
    w_int = torch.randint(0, 16, (16, 64))
    packed = reference.pack_int4(w_int)
    scale, zero = torch.rand(16, 2) + 0.1, torch.randint(0, 16, (16, 2)).float()
    with pytest.raises(TypeError, match="float x and uint8"):
        ops.int4_gemm(torch.zeros(2, 64, dtype=torch.int8), packed, scale, zero, 32)
    with pytest.raises(ValueError, match="K=62"):
        ops.int4_gemm(torch.zeros(2, 62), packed, scale, zero, 32)
    with pytest.raises(ValueError, match="multiple of group_size"):
        ops.int4_gemm(torch.zeros(2, 64), packed, scale, zero, 48)
    with pytest.raises(ValueError, match=r"\[N, K // group_size\]"):
        ops.int4_gemm(torch.zeros(2, 64), packed, scale[:, :1], zero[:, :1], 32)
    torch.library.opcheck(ops.int4_gemm, (torch.randn(3, 64), packed, scale, zero, 32))
    if cpu.int4_available():
        cpu_packed, scale_zeros = cpu.pack_int4_for_cpu(w_int, scale, zero)
        torch.library.opcheck(ops.int4_gemm_cpu, (torch.randn(3, 64), cpu_packed, scale_zeros, 32))


def test_pack_for_cpu_rejects_values_outside_four_bits():
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        cpu.pack_int4_for_cpu(torch.full((16, 32), 16), torch.ones(16, 1), torch.zeros(16, 1))
    with pytest.raises(ValueError, match="multiple of 16"):
        cpu.pack_int4_for_cpu(torch.full((8, 32), 3), torch.ones(8, 1), torch.zeros(8, 1))


def _w4(bits=4, group=32, symmetric=False, granularity="per_group"):
    weight = WeightScheme(bits=bits, granularity=granularity, group_size=group if granularity == "per_group" else None,
                          symmetric=symmetric)
    return Recipe(name=f"w{bits}-test", weight=weight, activation=None)


def _run(model, ids, recipe, kernels):
    torch._dynamo.reset()
    with torch.inference_mode():
        out = torch.compile(model, backend="qcompiler", options={"recipe": recipe, "kernels": kernels})(ids).logits
    return out, qcompiler.last_report()


@pytest.mark.parametrize("bits,symmetric", [pytest.param(4, False, marks=pytest.mark.inductor), (4, True), (3, False),
                                            (2, True)])
def test_weight_only_layers_are_lowered_and_match_the_qdq_reference(bits, symmetric):
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 16))
    recipe = _w4(bits=bits, symmetric=symmetric)
    with torch.inference_mode():
        float_logits = model(ids).logits
    ref, _ = _run(model, ids, recipe, "reference")
    fast, rep = _run(model, ids, recipe, "fast")
    counts = {p.name: p.counts for p in rep.passes}
    assert counts["lower"] == {"lowered": 14, "not_lowered": 0}
    quant_error = (ref - float_logits).abs().max()
    assert quant_error > 0
    if cpu.int4_available():  # bf16 activations: close to the reference, far closer than the rounding
        assert (fast - ref).abs().max() < 0.1 * quant_error
        kernel = rep.kernel_of["model.layers.0.self_attn.q_proj"][0]
        assert "_weight_int4pack_mm_for_cpu" in kernel
        kernel_bpw = 4 + 2 * 16 / 32  # in memory: a 4-bit container, bf16 scale and offset per group of 32
    else:
        torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)
    # stored: the integers at their bits, a float32 scale and (asymmetric) a float32 zero point per group of 32
    bpw = bits + (32 if symmetric else 64) / 32
    for d in rep.quantized:
        assert d.bits_per_weight == pytest.approx(bpw)
        numel = d.float_weight_bytes // 4
        assert 8 * d.kernel_bytes / numel == pytest.approx(kernel_bpw if cpu.int4_available() else 8 * d.kernel_bytes / numel)


def test_the_lowered_graph_holds_only_the_packed_weights():
    model = tiny_llama()
    recipe = _w4()
    captured = {}

    def keep(gm, example_inputs):
        from qcompiler.backend import qcompiler_backend

        out = qcompiler_backend(gm, example_inputs, options={"recipe": recipe})
        captured["gm"] = gm
        return out

    with torch.inference_mode():
        torch.compile(model, backend=keep)(torch.randint(0, 128, (1, 8)))
    assert {p.name: p.counts for p in qcompiler.last_report().passes}["lower"]["lowered"] == 14
    buffers = dict(captured["gm"].named_buffers())
    # no int8 copy of a 4-bit weight stays behind beside the packed one
    assert not [n for n in buffers if n.endswith(("_w_q", "_w_scale", "_w_zero_point"))]
    # a fixed row count (1 x 8 tokens): the int4 GEMV, whose q/k/v and gate/up weights fuse_gemv stacks
    packed = [n for n in buffers if n.endswith(("_w4_cpu", "_w4", "_w4t")) or n.endswith(("_int4_gemv_1", "_tiled_1"))]
    assert all(buffers[n].dtype == torch.uint8 for n in packed)
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not model.lm_head]
    assert sum(buffers[n].numel() for n in packed) == sum(m.weight.numel() // 2 for m in layers)


def test_group_size_the_cpu_kernel_does_not_take_is_routed_to_the_reference_and_reported():
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 8))  # 16 rows: more than the int4 GEMV takes (which takes any even group)
    recipe = _w4(group=16)
    ref, _ = _run(model, ids, recipe, "reference")
    fast, rep = _run(model, ids, recipe, "fast")
    kernel, _ = rep.kernel_of["model.layers.0.mlp.down_proj"]
    assert "int4 reference" in kernel and "group size 16" in kernel
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)
    assert "int4 reference" in str(rep)


def test_per_channel_four_bit_with_odd_k_stays_in_qdq_form_and_says_why():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(33, 16)

        def forward(self, x):
            return self.fc(x)

    model = Odd().eval()
    x = torch.randn(2, 33)
    with torch.inference_mode():
        out = torch.compile(model, backend="qcompiler",
                            options={"recipe": _w4(granularity="per_channel")})(x)
    rep = qcompiler.last_report()
    assert {p.name: p.counts for p in rep.passes}["lower"] == {"lowered": 0, "not_lowered": 1}
    kernel, why = rep.kernel_of["fc"]
    assert kernel == "reference quantize/dequantize ops" and "K=33 is odd" in why
    assert (out - model(x)).abs().max() < 0.5
