"""The decode GEMVs' code for the vector extensions this machine does not build for.

``lowering/kernels/cpu_gemv.cpp`` (and ``cpu_argmax.h``) is built with ``-march=native``, so a test run compiles
only the branch of its ``#if`` that this CPU takes (AVX-512 on most CI hosts): the AVX2 branch and the plain loops
would first be compiled, and could first fail, on a user's machine. Here the same source is built for Haswell
(AVX2 and FMA, no AVX-512) and for baseline x86-64 (the plain loops), its ops renamed into namespaces of their
own, and each build's results are compared with the native build's on the same inputs (the argmax header's with
``torch.argmax``). Slow: two builds of about 40 s each, and two small ones.
"""

import re
from pathlib import Path

import pytest
import torch

from qcompiler.lowering.kernels import native, reference

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(native.unavailable_reason() is not None,
                       reason=f"no C++ toolchain here: {native.unavailable_reason()}"),
]

SOURCE = Path(native.__file__).with_name("cpu_gemv.cpp")


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


# (-march, the gemv_isa() that build reports, the CPU flags it needs to run here)
TARGETS = [("haswell", "avx2", {"avx2", "fma", "f16c", "bmi2"}), ("x86-64", "generic", set())]


@pytest.mark.parametrize("march,isa,needs", TARGETS, ids=[t[0] for t in TARGETS])
def test_every_vector_branch_builds_and_computes_what_the_native_build_does(march, isa, needs, tmp_path):
    if not needs <= _cpu_flags():
        pytest.skip(f"this CPU can not run code built for {march} (needs {sorted(needs - _cpu_flags())})")
    ops = native.build_renamed(SOURCE.read_text(), "qcompiler_" + re.sub(r"\W", "_", march), tmp_path, march)
    assert ops.gemv_isa() == isa
    gen = torch.Generator().manual_seed(11)
    for m, n, k, group in [(1, 32, 64, 32), (3, 64, 576, 32), (2, 96, 576, 64), (8, 64, 256, 256),
                           (1, 64, 1536, 128), (2, 32, 2048, 2048), (1, 32, 36, 12), (1, 3072, 576, 64),
                           (2, 224, 576, 64)]:
        x = torch.randn(m, k, generator=gen)
        q = torch.randint(0, 16, (n, k), generator=gen)
        scale = torch.rand(n, k // group, generator=gen) * 0.01 + 1e-3
        zero = torch.randint(0, 16, (n, k // group), generator=gen).float()
        tiled, rows = reference.pack_int4_tiled(q, scale, zero), reference.pack_int4(q)
        expected = torch.ops.qcompiler.int4_gemv_tiled(x, *tiled, group)
        atol = 1e-5 * float(expected.abs().max())  # float32 sums in another order (the plain loops)
        torch.testing.assert_close(ops.int4_gemv_tiled(x, *tiled, group), expected, rtol=1e-5, atol=atol)
        torch.testing.assert_close(ops.int4_gemv(x, rows, scale, zero, group),
                                   torch.ops.qcompiler.int4_gemv(x, rows, scale, zero, group), rtol=1e-5, atol=atol)
        w8 = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
        x_q = torch.randint(0, 256, (m, k), dtype=torch.uint8, generator=gen)
        rowsum, w_scale = w8.sum(1, dtype=torch.int32), torch.rand(n, generator=gen)
        assert torch.equal(ops.int8_gemv(x_q, 128, w8, rowsum, w_scale),  # exact integer sums in every build
                           torch.ops.qcompiler.int8_gemv(x_q, 128, w8, rowsum, w_scale))
        torch.testing.assert_close(ops.int8_weight_gemv(x, w8, w_scale),
                                   torch.ops.qcompiler.int8_weight_gemv(x, w8, w_scale), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("march,isa,needs", TARGETS, ids=[t[0] for t in TARGETS])
def test_the_greedy_argmax_builds_for_each_branch_and_is_torch_argmax(march, isa, needs, tmp_path):
    """``cpu_argmax.h`` (the decode loop's greedy choice) has AVX-512, AVX2 and plain branches too."""
    if not needs <= _cpu_flags():
        pytest.skip(f"this CPU can not run code built for {march} (needs {sorted(needs - _cpu_flags())})")
    from torch.utils.cpp_extension import load_inline

    header = SOURCE.with_name("cpu_argmax.h")
    source = f'#include "{header}"\n' + """
    torch::Tensor argmax_rows(const torch::Tensor& x) {
      auto out = torch::empty({x.size(0)}, x.options().dtype(torch::kLong));
      for (int64_t r = 0; r < x.size(0); ++r) out[r] = row_argmax(x[r].data_ptr<float>(), x.size(1));
      return out;
    }"""
    module = load_inline(name="qcompiler_argmax_" + re.sub(r"\W", "_", march), cpp_sources=[source],
                         functions=["argmax_rows"], extra_cflags=["-O3", f"-march={march}"],
                         build_directory=str(tmp_path))
    gen = torch.Generator().manual_seed(5)
    for n in (1, 7, 8, 15, 16, 33, 49152):
        for case in range(4):
            x = torch.randn(3, n, generator=gen)
            if case == 1:
                x = x.round()  # ties: the first of equal maxima
            if case == 2:
                x[1, n // 2:] = float("nan")
            if case == 3:
                x[2] = float("-inf")
            assert torch.equal(module.argmax_rows(x), torch.argmax(x, dim=-1)), (n, case)
