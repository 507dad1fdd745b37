"""A rotated model's online Hadamard transform on few rows is one C++ call (``qcompiler::kron_hadamard``)
that computes what the graph's ops compute; prompts keep the GEMM form."""

import pytest
import torch
from graphs import decode_step, tiny_llama

import qcompiler
from qcompiler.config import Recipe, resolve_recipe
from qcompiler.core import hadamard
from qcompiler.lowering.kernels import native

needs_native = pytest.mark.skipif(native.unavailable_reason() is not None, reason="the C++ kernels are not built here")


@needs_native
@pytest.mark.parametrize("n", [96, 384, 576, 1536])
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_the_op_is_x_times_the_normalized_hadamard(n, rows):
    a, b = hadamard.kron_parts(n)
    x = torch.randn(rows, 2, n, generator=torch.Generator().manual_seed(n + rows))
    got = torch.ops.qcompiler.kron_hadamard(x, a.float(), b.float())
    torch.testing.assert_close(got, hadamard.apply_kron(x, a.float(), b.float()), rtol=1e-5, atol=1e-5)
    full = hadamard.hadamard(n).double() / n**0.5
    torch.testing.assert_close(got.double(), x.double() @ full, rtol=1e-5, atol=1e-5)
    # A = None: x @ B alone
    torch.testing.assert_close(torch.ops.qcompiler.kron_hadamard(x[..., :b.shape[0]], None, b.float()),
                               x[..., :b.shape[0]] @ b.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.inductor
@needs_native
def test_a_rotated_decode_step_calls_the_op_and_a_prompt_keeps_the_gemms():
    model = tiny_llama()  # intermediate 96: H12 x H8, online on both down projections
    recipe = resolve_recipe("w8a8-dynamic-rotated")
    assert isinstance(recipe, Recipe) and recipe.rotation is not None
    fast, report = decode_step(model, recipe, "fast")
    counts = {k: v for p in report.passes for k, v in p.counts.items()}
    assert counts["online_hadamard"] == 2
    reference, _ = decode_step(model, recipe, "reference")
    torch.testing.assert_close(fast, reference, rtol=0.05, atol=0.05 * reference.abs().max().item())
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="qcompiler", options={"recipe": recipe})
    with torch.inference_mode():
        compiled(input_ids=torch.randint(0, 128, (1, 12)), use_cache=False)
    counts = {k: v for p in qcompiler.last_report().passes for k, v in p.counts.items()}
    assert counts["online_hadamard"] == 0  # 12 rows: the GEMMs
