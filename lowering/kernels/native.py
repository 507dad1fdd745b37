"""The C++ kernels of the decode step (``cpu_gemv.cpp``, ``cpu_attention.cpp``, ``cpu_hadamard.cpp``) and of
calibration (``cpu_histogram.cpp``), built at first use for this machine.

``qcompiler::int8_gemv`` (uint8 activations with a zero point x int8 weights, exact int32 sums),
``qcompiler::int8_weight_gemv`` (float32 activations x int8 weights), ``qcompiler::int4_gemv``
(float32 activations x packed 4-bit weights with group scales and zeros) and ``qcompiler::int4_gemv_tiled`` (the
same on weights in tiles of 32 rows, for AVX-512 and AVX2), ``qcompiler::decode_attention``
(one query position over the filled part of a static KV cache) and ``qcompiler::kron_hadamard`` (a rotated
model's online Hadamard transform, ``x @ kron(A, B)``) are C++ ops (and ``qcompiler::histogram_bins``, the bin
counts of a calibration histogram, which the observers call on every batch): a compiled
graph calls them without running any Python, which matters in the decode step where each of them
takes tens of microseconds. ``cpu_calls.cpp`` gives the decode ops direct Python entry points (:func:`direct`),
which Inductor's wrapper calls instead of the dispatcher (``direct_calls.py``), and the greedy choice of a token
(``greedy_tokens``: ``torch.argmax`` over a step's logits, vectorized) that the decode loop calls. The GEMVs are
for a few rows (the lowering uses them when a graph's row count is fixed and small); larger products keep the
library kernels of ``cpu.py``.

The source is compiled with ``-O3 -march=native -fopenmp`` by ``torch.utils.cpp_extension`` (the same
C++ toolchain Inductor needs for CPU code; without OpenMP, ATen's ``parallel_for`` compiles to a plain
loop and the kernels ran on one thread) once per machine type: the build (about 30 s) is cached in
``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``) under a name that includes a hash of
the CPU's model and flags, so a cache shared by other machines never runs code built for another ISA.
Where it cannot be built, :func:`unavailable_reason` says why and the lowering keeps the library
kernels (and the report names the reason).
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import torch

from qcompiler.lowering.kernels.reference import INT4_TILE

SOURCES = tuple(Path(__file__).with_name(f)
                for f in ("cpu_gemv.cpp", "cpu_attention.cpp", "cpu_hadamard.cpp", "cpu_histogram.cpp", "cpu_calls.cpp"))
OPS = ("int8_gemv", "int8_weight_gemv", "int4_gemv", "int4_gemv_tiled", "gemv_threads", "gemv_isa", "decode_attention",
       "kron_hadamard", "histogram_bins")


def _machine_tag() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    fields = [line for line in text.splitlines() if line.startswith(("model name", "flags"))][:2]
    digest = hashlib.sha256(("\n".join(fields) + torch.__version__).encode()).hexdigest()[:12]
    return digest


_module = None  # the built extension: the ops' direct Python entry points (cpu_calls.cpp)


@functools.cache
def _build() -> str | None:
    """Build and load the ops; None on success, else why not."""
    global _module
    try:
        from torch.utils.cpp_extension import load

        module = load(name=f"qcompiler_cpu_gemv_{_machine_tag()}", sources=[str(p) for p in SOURCES],
                      extra_cflags=_cflags("native"), extra_ldflags=["-fopenmp"], is_python_module=True,
                      verbose=False)
    except Exception as exc:  # a missing compiler or headers: the library kernels stay, and the report says why
        return f"the C++ GEMV kernels could not be built ({type(exc).__name__}: {str(exc)[:200]})"
    _register_fakes()
    from qcompiler.lowering.kernels import direct_calls

    direct_calls.register(module)
    _module = module
    return None


def direct(op: str, build: bool = True):
    """The direct Python entry point of op (``cpu_calls.cpp``: same arguments, no dispatcher), building the ops
    first (with ``build=False``, only where they are built already); None where they are not."""
    if _module is None and (not build or _build() is not None):
        return None
    return getattr(_module, op)


def _cflags(march: str) -> list[str]:
    return ["-O3", f"-march={march}", "-fopenmp"]


def build_renamed(source: str, namespace: str, folder: Path, march: str = "native"):
    """``source``, the text of a kernel file such as ``cpu_gemv.cpp`` (this one, or another revision's), built for
    ``-march=march`` in ``folder`` with its ops registered under ``namespace`` instead of ``qcompiler``, so that it
    loads beside the package's own build; returns ``torch.ops.<namespace>``. For tests and benchmarks that compare
    builds (``tests/lowering/test_gemv_isas.py``, ``examples/bench_gemv_revisions.py``)."""
    from torch.utils.cpp_extension import load

    for macro in ("TORCH_LIBRARY_FRAGMENT", "TORCH_LIBRARY_IMPL"):
        source = source.replace(f"{macro}(qcompiler,", f"{macro}({namespace},")
    cpp = folder / f"{namespace}.cpp"
    cpp.write_text(source)
    load(name=namespace, sources=[str(cpp)], extra_cflags=_cflags(march), extra_ldflags=["-fopenmp"],
         is_python_module=False, build_directory=str(folder))
    return getattr(torch.ops, namespace)


def _register_fakes() -> None:
    @torch.library.register_fake("qcompiler::int8_gemv")
    def _(x_q, x_zero_point, w_q, w_rowsum, w_scale):
        return x_q.new_empty((*x_q.shape[:-1], w_q.shape[0]), dtype=torch.float32)

    @torch.library.register_fake("qcompiler::int8_weight_gemv")
    def _(x, w_q, w_scale):
        return x.new_empty((*x.shape[:-1], w_q.shape[0]))

    @torch.library.register_fake("qcompiler::int4_gemv")
    def _(x, w_packed, scale, zero, group_size):
        return x.new_empty((*x.shape[:-1], w_packed.shape[0]))

    @torch.library.register_fake("qcompiler::int4_gemv_tiled")
    def _(x, w_tiled, scale, zero, group_size):
        return x.new_empty((*x.shape[:-1], w_tiled.shape[0] * INT4_TILE))

    @torch.library.register_fake("qcompiler::decode_attention")
    def _(q, k, v, mask, scale):
        return q.new_empty(q.shape)

    @torch.library.register_fake("qcompiler::kron_hadamard")
    def _(x, a, b):
        return x.new_empty(x.shape)

    @torch.library.register_fake("qcompiler::histogram_bins")
    def _(x, shift, bins):
        return x.new_empty((bins,), dtype=torch.int64)


def isa() -> str | None:
    """The vector code the built kernels run ("avx512-vnni", "avx512", "avx2-vnni", "avx2" or "generic"), None where
    they are not built."""
    return None if _build() is not None else str(torch.ops.qcompiler.gemv_isa())


def unavailable_reason() -> str | None:
    """None when the GEMV ops are loaded (building them on the first call), else why they cannot be."""
    return _build()
