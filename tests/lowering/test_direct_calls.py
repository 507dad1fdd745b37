"""The decode kernels' direct entry points (cpu_calls.cpp) and Inductor's wrapper calling them."""

from __future__ import annotations

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from qcompiler.core import hadamard
from qcompiler.lowering.kernels import direct_calls, native, reference

pytestmark = pytest.mark.skipif(native.unavailable_reason() is not None,
                                reason=f"no C++ toolchain here: {native.unavailable_reason()}")


def _int8_args(n=40, k=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (1, k), generator=gen, dtype=torch.int32).to(torch.uint8)
    w = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int32).to(torch.int8)
    return x, 128, w, w.sum(1, dtype=torch.int32), torch.rand(n, generator=gen)


def _attention_args(mask: bool):
    gen = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(1, 4, 1, 16, generator=gen), torch.randn(1, 2, 9, 16, generator=gen), \
        torch.randn(1, 2, 9, 16, generator=gen)
    m = (torch.arange(9) < 6).view(1, 1, 1, 9) if mask else None
    return q, k, v, m, 0.25


def _int4_args(tiled: bool, n=64, k=128, group=32):
    gen = torch.Generator().manual_seed(3)
    x, q = torch.randn(1, k, generator=gen), torch.randint(0, 16, (n, k), generator=gen)
    scale = torch.rand(n, k // group, generator=gen) * 0.01 + 1e-3
    zero = torch.randint(0, 16, (n, k // group), generator=gen).float()
    if tiled:
        return (x, *reference.pack_int4_tiled(q, scale, zero), group)
    return x, reference.pack_int4(q), scale, zero, group


def _hadamard_args(first: bool):
    a, b = hadamard.kron_parts(576)
    x = torch.randn(2, 576, generator=torch.Generator().manual_seed(4))
    return (x, a.float(), b.float()) if first else (x[:, :b.shape[0]], None, b.float())


@pytest.mark.parametrize("op, args", [
    ("int8_gemv", _int8_args()),
    ("int8_weight_gemv", (torch.randn(1, 32), _int8_args()[2], torch.rand(40))),
    ("int4_gemv", _int4_args(tiled=False)),
    ("int4_gemv_tiled", _int4_args(tiled=True)),
    ("decode_attention", _attention_args(mask=True)),
    ("decode_attention", _attention_args(mask=False)),
    ("kron_hadamard", _hadamard_args(first=True)),
    ("kron_hadamard", _hadamard_args(first=False)),
])
def test_a_direct_call_returns_the_ops_result_bit_for_bit(op, args):
    expected = getattr(torch.ops.qcompiler, op).default(*args)
    assert torch.equal(native.direct(op)(*args), expected)


def test_every_listed_op_has_an_entry_point_and_a_wrapper_hook():
    from torch._inductor.codegen.custom_extern_kernel_codegen import CUSTOM_EXTERN_KERNEL_CODEGEN
    from torch._inductor.select_algorithm import extern_kernels

    for op in direct_calls.OPS:
        assert hasattr(torch.ops.qcompiler, op)
        assert getattr(extern_kernels, direct_calls.PREFIX + op) is native.direct(op)
        assert direct_calls.op_name(op) in CUSTOM_EXTERN_KERNEL_CODEGEN


def test_bad_arguments_raise_errors_that_name_the_call():
    call = native.direct("int8_gemv")
    x, zp, w, rowsum, scale = _int8_args()
    with pytest.raises(TypeError, match=r"int8_gemv\(\) takes 5 arguments \(4 given\)"):
        call(x, zp, w, rowsum)
    with pytest.raises(TypeError, match=r"int8_gemv\(\): argument 1 must be an int, not str"):
        call(x, "128", w, rowsum, scale)
    with pytest.raises(TypeError, match=r"int8_gemv\(\): argument 2 must be a Tensor, not list"):
        call(x, zp, [1], rowsum, scale)
    with pytest.raises(RuntimeError, match="int8_gemv takes uint8 activations"):  # the kernel's own check
        call(x.float(), zp, w, rowsum, scale)
    with pytest.raises(RuntimeError, match=r"int8_gemv\(\): argument 4 must be a CPU tensor, got one on meta"):
        call(x, zp, w, rowsum, scale.to("meta"))
    with pytest.raises(TypeError, match=r"decode_attention\(\): argument 4 must be a float, not NoneType"):
        native.direct("decode_attention")(*_attention_args(mask=False)[:4], None)


class _Step(torch.nn.Module):
    """A decode-shaped layer as the lowered graphs have it: per-token int8 activations, an int8 GEMV, then
    attention over a small cache."""

    def __init__(self) -> None:
        super().__init__()
        _, _, w, rowsum, scale = _int8_args(n=64, k=64)
        self.register_buffer("w", w)
        self.register_buffer("rowsum", rowsum)
        self.register_buffer("scale", scale)

    def forward(self, x, k, v):
        step = x.abs().amax(-1, keepdim=True) / 127.0
        xq = (torch.round(x / step) + 128).clamp(1, 255).to(torch.uint8)
        y = torch.ops.qcompiler.int8_gemv(xq, 128, self.w, self.rowsum, self.scale) * step
        return torch.ops.qcompiler.decode_attention(y.view(1, 4, 1, 16), k, v, None, 0.25)


def test_inductors_wrapper_calls_the_entry_points_with_the_same_results():
    from torch._inductor.utils import fresh_cache

    torch._dynamo.reset()
    model = _Step()
    x, k, v = torch.randn(1, 64), torch.randn(1, 2, 7, 16), torch.randn(1, 2, 7, 16)
    with torch.no_grad(), fresh_cache():  # (code from the on-disk cache would not show what is generated now)
        expected = model(x, k, v)
        got, (code, *_) = run_and_get_code(torch.compile(model, backend="inductor", fullgraph=True), x, k, v)
    assert "extern_kernels.qcompiler_int8_gemv(" in code
    assert "extern_kernels.qcompiler_decode_attention(" in code
    assert "= torch.ops.qcompiler." not in code  # (the ops are still named in size asserts and comments)
    assert torch.equal(got, expected)


def test_a_direct_call_shows_in_the_profiler_under_the_ops_name():
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        native.direct("int8_gemv")(*_int8_args())
    assert "qcompiler::int8_gemv" in {e.key for e in prof.key_averages()}


@pytest.mark.parametrize("rows, n", [(1, 49152), (3, 1), (2, 15), (4, 1000), (2, 33)])
def test_greedy_tokens_are_torch_argmax_with_ties_nans_and_infinities(rows, n):
    greedy = native.direct("greedy_tokens")
    gen = torch.Generator().manual_seed(n)
    for case in range(6):
        x = torch.randn(rows, n, generator=gen)
        if case == 1:  # ties: the first of equal maxima
            x = x.round()
        if case == 2:
            x[:, n // 2:] = float("nan")
            x[0, n // 3] = float("nan")
        if case == 3:
            x[:] = float("-inf")
        if case == 4:
            x[-1, -1] = float("inf")
        if case == 5:  # rows of a wider tensor: strided rows, contiguous within
            x = torch.randn(rows, n + 7, generator=gen)[:, 3:n + 3]
        assert torch.equal(greedy(x), torch.argmax(x, dim=-1)), case


def test_greedy_tokens_refuses_what_it_does_not_take():
    greedy = native.direct("greedy_tokens")
    with pytest.raises(RuntimeError, match=r"greedy_tokens takes float32 CPU logits \[rows, n > 0\]"):
        greedy(torch.randn(2, 8, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="greedy_tokens takes float32"):
        greedy(torch.randn(8, 2).t())  # columns not contiguous
    with pytest.raises(RuntimeError, match="greedy_tokens takes float32"):
        greedy(torch.randn(2, 0))


@pytest.mark.inductor  # (elsewhere the test suite swaps compile_with_inductor out: tests/conftest.py)
def test_the_backend_puts_the_direct_calls_in_inductors_cache_key(monkeypatch):
    import torch._inductor.compile_fx as compile_fx_module

    from qcompiler import backend

    given = {}
    monkeypatch.setattr(compile_fx_module, "compile_fx", lambda gm, inputs, config_patches: given.update(config_patches))
    backend.compile_with_inductor(torch.fx.symbolic_trace(torch.nn.ReLU()), [torch.randn(2)])
    assert given["post_grad_custom_post_pass"] is direct_calls.CACHE_KEY and given["size_asserts"] is False
    on = direct_calls.CACHE_KEY.uuid()
    assert on.endswith(":on") and direct_calls.registered()
    from torch._inductor.codegen.custom_extern_kernel_codegen import CUSTOM_EXTERN_KERNEL_CODEGEN

    monkeypatch.delitem(CUSTOM_EXTERN_KERNEL_CODEGEN, direct_calls.op_name("int8_gemv"))
    assert direct_calls.CACHE_KEY.uuid() == on[:-len(":on")] + ":off"


def test_where_the_wrapper_needs_its_own_call_it_calls_the_op_as_before():
    from torch._inductor import config
    from torch._inductor.utils import fresh_cache

    torch._dynamo.reset()
    model = _Step()
    x, k, v = torch.randn(1, 64), torch.randn(1, 2, 7, 16), torch.randn(1, 2, 7, 16)
    with torch.no_grad(), fresh_cache(), config.patch(generate_intermediate_hooks=True):
        expected = model(x, k, v)
        got, (code, *_) = run_and_get_code(torch.compile(model, backend="inductor", fullgraph=True), x, k, v)
    assert "= torch.ops.qcompiler.int8_gemv.default(" in code and "extern_kernels.qcompiler_" not in code
    assert torch.equal(got, expected)
