"""``qcompiler bench kernels``: each ``qcompiler::`` kernel against its float baseline, side by side.

For every shape ``(M, N, K)`` (``M`` rows of activations, an ``[N, K]`` weight) one process times, in
interleaved repeats (so drift hits both alike) and reports medians:

- ``w8a8``: what the lowering emits for a dynamic per-token layer, against ``F.linear`` in the float
  dtype. On CPU: ``qcompiler::int8_gemm`` on per-token int8 activations times the per-token scale
  (the activation rounding before it is fused by Inductor into the preceding op in a compiled
  model, so it is not timed here). On CUDA: ``qcompiler::quantize_per_token`` then
  ``qcompiler::int8_linear`` (two Triton kernels, the scales and cast in the GEMM's epilogue),
  quantization included. On CUDA also the bare Triton int8 GEMM against ``torch._int_mm`` (cuBLAS
  int8) on the same int8 operands, and the Triton per-token quantization kernel against the same
  math in eager torch.
- ``w4a16``: the 4-bit weight-only layer (group 128, or 64/32 where 128 does not divide K) against ``F.linear``: ATen's int4 kernel on CPU,
  the Triton kernel on CUDA.

Ratios are ``baseline time / kernel time`` (above 1: the kernel is faster). Achieved TFLOP/s count
``2 M N K`` operations; GB/s count the bytes of the weight as the kernel stores it plus activations
in and out, the number that matters at ``M = 1``. With a peak memory bandwidth (``peak_gbps``: given,
or looked up in :data:`PEAK_GBPS` from the CUDA device's name; none on CPU) the ``w4a16`` rows also
say which percent of it they reach (``pct_peak_bw``), the figure of merit of the batch-1 GEMV.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from qcompiler.config import WeightScheme
from qcompiler.core import primitives
from qcompiler.core.errors import ConfigError, QCompilerError
from qcompiler.lowering import ops
from qcompiler.lowering.kernels import cpu, reference
from qcompiler.tools.timing import machine_name, time_pair

DEFAULT_SHAPES = (
    # SmolLM2-135M's layers (hidden 576, MLP 1536) and a 7B-class square layer
    (1, 1536, 576), (1, 576, 1536), (1, 4096, 4096),
    (16, 1536, 576), (16, 4096, 4096),
    (512, 1536, 576), (512, 576, 1536), (512, 4096, 4096),
)
# On CUDA also the square 4096^3 GEMM the int8 target (>= 80% of cuBLAS torch._int_mm) is stated at.
CUDA_SHAPES = DEFAULT_SHAPES + ((4096, 4096, 4096),)

# Peak memory bandwidth in GB/s (vendor specifications), by the tokens of torch.cuda.get_device_name:
# the first entry whose tokens all occur wins, so more specific entries come first.
PEAK_GBPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("h200",), 4800.0),
    (("h100", "nvl"), 3938.0),
    (("h100", "pcie"), 2000.0),
    (("h100",), 3350.0),  # SXM5, "NVIDIA H100 80GB HBM3"
    (("a100", "80gb", "pcie"), 1935.0),
    (("a100", "80gb"), 2039.0),  # SXM4
    (("a100",), 1555.0),  # 40 GB, SXM4 and PCIe
    (("l40s",), 864.0),
    (("a10g",), 600.0),
    (("a10",), 600.0),
    (("l4",), 300.0),
)


def default_shapes(device: torch.device) -> tuple[tuple[int, int, int], ...]:
    return CUDA_SHAPES if device.type == "cuda" else DEFAULT_SHAPES


def peak_gbps_for(device_name: str) -> float | None:
    """The peak memory bandwidth of a GPU named ``device_name`` from :data:`PEAK_GBPS`, None if unknown."""
    tokens = set(re.split(r"[^a-z0-9]+", device_name.lower()))
    return next((gbps for needed, gbps in PEAK_GBPS if set(needed) <= tokens), None)


@dataclass
class Row:
    op: str
    m: int
    n: int
    k: int
    kernel: str
    baseline: str
    kernel_us: float
    baseline_us: float
    ratio: float  # baseline / kernel
    kernel_tflops: float
    kernel_gbps: float
    max_abs_error: float  # kernel vs its exact reference (not vs float: that is the quantization error)
    pct_peak_bw: float | None = None  # kernel GB/s in percent of the peak memory bandwidth (w4a16 rows)


def _int8_weight(n: int, k: int, device: torch.device, gen: torch.Generator):
    w = torch.randn(n, k, generator=gen) * 0.05
    block = primitives.per_channel(2)
    w_scale, _ = primitives.choose_qparams_math(w, block, -127, 127, True)  # [N, 1]
    w_q = primitives.quantize_math(w, w_scale, None, block, -127, 127, torch.int8)
    w_scale = w_scale.reshape(n)
    return w_q.to(device), w_scale.to(device)


def _row(op, m, n, k, kernel, baseline, t_kernel, t_base, stored_bytes, act_bytes, error) -> Row:
    return Row(op, m, n, k, kernel, baseline, t_kernel * 1e6, t_base * 1e6, t_base / t_kernel,
               2 * m * n * k / t_kernel / 1e12, (stored_bytes + act_bytes) / t_kernel / 1e9, error)


def bench_w8a8(m, n, k, device, dtype, repeats, gen, triton: bool = False, fused: bool | None = None) -> list[Row]:
    """``fused`` (default: on CUDA) times the CUDA lowering's two ops instead of the CPU lowering's GEMM."""
    w_q, w_scale = _int8_weight(n, k, device, gen)
    w_float = (w_q.float() * w_scale[:, None]).to(dtype)
    x = torch.randn(m, k, generator=gen).to(device, dtype)
    handle = ops.prepare_weight(w_q, w_scale)
    block = primitives.per_token(2)
    x_scale, _ = primitives.choose_qparams_math(x.float(), block, -127, 127, True)
    x_q = primitives.quantize_math(x.float(), x_scale, None, block, -127, 127, torch.int8)
    fused = device.type == "cuda" if fused is None else fused

    if fused:
        kernel = "qcompiler::quantize_per_token + qcompiler::int8_linear (" + (
            "Triton, scales in the GEMM epilogue)" if device.type == "cuda" else f"{device.type} references)")

        def layer():
            q, s = torch.ops.qcompiler.quantize_per_token(x, None)
            return torch.ops.qcompiler.int8_linear(q, s, 0, w_q, w_scale, None, None, dtype)
    else:
        kernel = ops.kernel_for(device)

        def layer():
            return (torch.ops.qcompiler.int8_gemm(x_q, 0, w_q, w_scale, handle) * x_scale).to(dtype)

    exact = (reference.int8_gemm(x_q.cpu(), 0, w_q.cpu(), w_scale.cpu()) * x_scale.cpu()).to(dtype)
    error = float((layer().cpu().float() - exact.float()).abs().max())
    t_k, t_b = time_pair(layer, lambda: F.linear(x, w_float), device, repeats)
    weight_bytes = w_q.numel() + 4 * n
    act_bytes = (x.numel() * x.element_size() if fused else 0) + x_q.numel() + m * n * x.element_size()
    rows = [_row("w8a8", m, n, k, kernel, f"F.linear {str(dtype).removeprefix('torch.')}",
                 t_k, t_b, weight_bytes, act_bytes, error)]
    if triton:
        from qcompiler.lowering.kernels import triton_int8, triton_quant

        def eager_quant():
            s, _ = primitives.choose_qparams_math(x, block, -127, 127, True)
            return primitives.quantize_math(x, s, None, block, -127, 127, torch.int8)

        q_triton, _ = triton_quant.quantize_per_token(x)
        mismatch = float((q_triton.float() - x_q.float()).abs().max())
        t_k, t_b = time_pair(lambda: triton_quant.quantize_per_token(x), eager_quant, device, repeats)
        rows.append(_row("quant/token", m, 0, k, "Triton quantize_per_token", "eager torch absmax + round", t_k, t_b,
                         0, x.numel() * x.element_size() + x.numel() + 4 * m, mismatch))

        mm_m = max(m, 17)  # torch._int_mm needs more than 16 rows
        x_mm = torch.randint(-127, 128, (mm_m, k), generator=gen, dtype=torch.int8).to(device)
        w_t = w_q.t()  # [K, N], column-major: the layout cuBLAS takes without a copy
        ones_m, ones_n = torch.ones(mm_m, device=device), torch.ones(n, device=device)

        def triton_gemm():
            return triton_int8.int8_gemm(x_mm, ones_m, w_q, ones_n)

        exact = float((triton_gemm() - torch._int_mm(x_mm, w_t).float()).abs().max())
        t_k, t_b = time_pair(triton_gemm, lambda: torch._int_mm(x_mm, w_t), device, repeats)
        rows.append(_row("int8 GEMM", mm_m, n, k, "Triton int8_gemm", "torch._int_mm (cuBLAS int8)", t_k, t_b,
                         w_q.numel(), x_mm.numel() + 4 * mm_m * n, exact))
    return rows


def bench_w4a16(m, n, k, device, dtype, repeats, gen, triton: bool = False, group: int = 128) -> list[Row]:
    scheme = WeightScheme(bits=4, granularity="per_group", group_size=group, symmetric=False, fit_group=True).fitted(k)
    group = scheme.group_size  # the presets' rule: 576 -> 64
    if k % group:
        return []
    w_int = torch.randint(0, 16, (n, k), generator=gen)
    scale = torch.rand(n, k // group, generator=gen) * 0.01 + 1e-3
    zero = torch.randint(0, 16, (n, k // group), generator=gen).float()
    w_float = ((w_int.float() - zero.repeat_interleave(group, 1)) * scale.repeat_interleave(group, 1))
    x = torch.randn(m, k, generator=gen).to(device, dtype)
    exact = reference.int4_gemm(x.cpu().float(), reference.pack_int4(w_int), scale, zero, group)
    if device.type == "cpu" and not triton:
        why = ops.int4_cpu_reason(n, k, group)
        if why is not None:
            return []
        packed, scale_zeros = cpu.pack_int4_for_cpu(w_int, scale, zero)
        stored = packed.numel() * packed.element_size() + scale_zeros.numel() * scale_zeros.element_size()

        def layer():
            return torch.ops.qcompiler.int4_gemm_cpu(x, packed, scale_zeros, group)

        kernel = ops.kernel_for(device, 4)
    else:
        from qcompiler.lowering.kernels import triton_int4

        kernel = "Triton int4_gemm"
        packed = reference.pack_int4(w_int).to(device)
        scale_d, zero_d = scale.to(device), zero.to(device)
        stored = packed.numel() + 8 * scale.numel()

        def layer():
            return triton_int4.int4_gemm(x, packed, scale_d, zero_d, group)
    w_dev = w_float.to(device, dtype)
    error = float((layer().cpu().float() - exact).abs().max())
    t_k, t_b = time_pair(layer, lambda: F.linear(x, w_dev), device, repeats)
    return [_row(f"w4a16 g{group}", m, n, k, kernel, f"F.linear {str(dtype).removeprefix('torch.')}",
                 t_k, t_b, stored, x.numel() * x.element_size() + m * n * x.element_size(), error)]


def bench_kernels(device: str = "cpu", shapes=None, repeats: int = 30, dtype: torch.dtype | None = None,
                  progress: Callable[[str], None] | None = None, triton: bool | None = None,
                  peak_gbps: float | None = None) -> dict:
    """Time every kernel on ``device`` for each shape (default :func:`default_shapes`). ``triton``
    (default: on CUDA) adds the Triton kernels' rows; on CPU tensors they run only under
    ``TRITON_INTERPRET=1`` (tests, not timing). ``peak_gbps``: the device's peak memory bandwidth
    (default: :func:`peak_gbps_for` its name on CUDA, none on CPU) for the ``pct_peak_bw`` column."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise QCompilerError("--device cuda was asked for, but torch sees no CUDA GPU")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"bench kernels runs on cpu or cuda, not {device!r}")
    if peak_gbps is not None and not peak_gbps > 0:
        raise ConfigError(f"peak_gbps must be positive, got {peak_gbps}")
    dtype = dtype or (torch.float16 if dev.type == "cuda" else torch.float32)
    triton = dev.type == "cuda" if triton is None else triton
    machine = torch.cuda.get_device_name(dev) if dev.type == "cuda" else machine_name()
    peak_source = "given" if peak_gbps is not None else None
    if peak_gbps is None and dev.type == "cuda":
        peak_gbps = peak_gbps_for(machine)
        peak_source = "PEAK_GBPS table" if peak_gbps is not None else None
    gen = torch.Generator().manual_seed(0)
    rows: list[Row] = []
    for m, n, k in default_shapes(dev) if shapes is None else shapes:
        if progress:
            progress(f"M={m} N={n} K={k}")
        with torch.inference_mode():
            rows += bench_w8a8(m, n, k, dev, dtype, repeats, gen, triton)
            rows += bench_w4a16(m, n, k, dev, dtype, repeats, gen, triton)
    if peak_gbps is not None:
        for r in rows:
            if r.op.startswith("w4a16"):
                r.pct_peak_bw = 100.0 * r.kernel_gbps / peak_gbps
    return {
        "device": device, "machine": machine, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "dtype": str(dtype), "repeats": repeats, "peak_gbps": peak_gbps, "peak_gbps_source": peak_source,
        "rows": [asdict(r) for r in rows],
    }


def format_table(result: dict) -> str:
    lines = [f"{result['device']} ({result['machine']}), torch {result['torch']}, {result['threads']} threads, "
             f"medians of up to {result['repeats']} interleaved repeats"]
    if result.get("peak_gbps"):
        lines.append(f"peak memory bandwidth {result['peak_gbps']:.0f} GB/s ({result.get('peak_gbps_source')}): "
                     f"'%peak' is the w4a16 rows' GB/s against it")
    head = (f"{'op':<11} {'M':>4} {'N':>5} {'K':>5}  {'kernel us':>10} {'base us':>10} {'ratio':>6} {'TFLOP/s':>8} "
            f"{'GB/s':>7} {'%peak':>6}  baseline")
    lines.append(head)
    for r in result["rows"]:
        pct = f"{r['pct_peak_bw']:>5.1f}%" if r.get("pct_peak_bw") is not None else f"{'':>6}"
        lines.append(f"{r['op']:<11} {r['m']:>4} {r['n']:>5} {r['k']:>5}  {r['kernel_us']:>10.1f} {r['baseline_us']:>10.1f} "
                     f"{r['ratio']:>5.2f}x {r['kernel_tflops']:>8.3f} {r['kernel_gbps']:>7.1f} {pct}  {r['baseline']}")
    kernels = sorted({(r["op"], r["kernel"]) for r in result["rows"]})
    lines.extend(f"  {op}: {kernel}" for op, kernel in kernels)
    return "\n".join(lines)
