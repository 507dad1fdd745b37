"""Dynamic per-token activation quantization in Triton, optionally dividing by a SmoothQuant scale.

    x_s = x / smooth              (if given; per input channel)
    scale[m] = max(max_k |x_s[m, k]| / 127, MIN_SCALE)
    q[m, k] = round_half_even(x_s[m, k] / scale[m])   as int8 in [-127, 127]

The same arithmetic as ``qcompiler.core.primitives`` (choose_qparams_math / quantize_math) for per-token
symmetric int8 on ``x`` upcast to fp32, so the Triton path and the reference agree bit for bit. Every
division is ``div_rn`` (IEEE round to nearest, as torch divides): Triton's ``/`` on fp32 compiles
to ``div.full.f32``, which is off by up to 2 ulp and would move values across rounding ties. One
program per row: a first pass over K finds the absmax, a second quantizes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from qcompiler.core.primitives import MIN_SCALE
from qcompiler.lowering.kernels.autotune import interpreting

# fp32 values below 2**22 in magnitude: adding and subtracting 1.5 * 2**23 rounds to nearest even.
# Used under the interpreter, where libdevice's rint is not available; compiled kernels use rint.
ROUND_MAGIC = tl.constexpr(12582912.0)


@triton.jit
def round_half_even(x, USE_RINT: tl.constexpr):
    if USE_RINT:
        return libdevice.rint(x)
    return (x + ROUND_MAGIC) - ROUND_MAGIC


@triton.jit
def quantize_per_token_kernel(
    x_ptr, smooth_ptr, q_ptr, scale_ptr,
    M, K,
    stride_xm, stride_xk, stride_qm, stride_qk,
    min_scale,
    HAS_SMOOTH: tl.constexpr, USE_RINT: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(axis=0)
    offs = tl.arange(0, BLOCK_K)
    absmax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs
        mask = k < K
        x = tl.load(x_ptr + row * stride_xm + k * stride_xk, mask=mask, other=0.0).to(tl.float32)
        if HAS_SMOOTH:
            x = tl.math.div_rn(x, tl.load(smooth_ptr + k, mask=mask, other=1.0).to(tl.float32))
        absmax = tl.maximum(absmax, tl.abs(x))
    scale = tl.maximum(tl.math.div_rn(tl.max(absmax, axis=0), 127.0), min_scale)
    tl.store(scale_ptr + row, scale)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs
        mask = k < K
        x = tl.load(x_ptr + row * stride_xm + k * stride_xk, mask=mask, other=0.0).to(tl.float32)
        if HAS_SMOOTH:
            x = tl.math.div_rn(x, tl.load(smooth_ptr + k, mask=mask, other=1.0).to(tl.float32))
        q = tl.minimum(tl.maximum(round_half_even(tl.math.div_rn(x, scale), USE_RINT), -127.0), 127.0)
        tl.store(q_ptr + row * stride_qm + k * stride_qk, q.to(tl.int8), mask=mask)


def quantize_per_token(x: torch.Tensor, smooth: torch.Tensor | None = None,
                       block_k: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher: ``(q int8 [M, K], scale float32 [M, 1])`` for ``x [M, K]`` (fp32/fp16/bf16) and an
    optional SmoothQuant ``smooth [K]`` that ``x`` is divided by first."""
    if x.dim() != 2:
        raise ValueError(f"quantize_per_token: x must be [M, K], got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"quantize_per_token: x must be floating point, got {x.dtype}")
    m, k = x.shape
    if smooth is not None:
        if smooth.numel() != k or not smooth.is_floating_point():
            raise ValueError(f"quantize_per_token: smooth must be float with K={k} entries, got {smooth.dtype} "
                             f"{tuple(smooth.shape)}")
        if smooth.device != x.device:
            raise ValueError(f"quantize_per_token: x on {x.device} but smooth on {smooth.device}")
        smooth = smooth.reshape(-1).contiguous()
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m == 0:
        return q, scale
    block = min(block_k, triton.next_power_of_2(max(k, 16)))
    quantize_per_token_kernel[(m,)](
        x, smooth if smooth is not None else x, q, scale,
        m, k,
        x.stride(0), x.stride(1), q.stride(0), q.stride(1),
        MIN_SCALE,
        HAS_SMOOTH=smooth is not None, USE_RINT=not interpreting(), BLOCK_K=block,
    )
    return q, scale
