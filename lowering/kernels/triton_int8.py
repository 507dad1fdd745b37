"""W8A8 GEMM in Triton: int8 x int8 -> int32 accumulation with a fused epilogue.

    out[m, n] = (sum_k (a[m, k] - a_zp) * w[n, k]) * w_scale[n] * a_scale[m or 0] + bias[n]

(multiplied in that order, as ``reference.int8_gemm(...) * a_scale + bias`` does, so results without
a bias match the reference bit for bit where no FMA contraction happens, e.g. the interpreter).

Activations are int8 (symmetric, zero point 0) or uint8 with a zero point (asymmetric static). ``tl.dot``
takes int8 only, so uint8 activations are shifted by 128 into int8 inside the kernel and the shift is
corrected in the epilogue with the weight's per-output-channel sums over K (the row sums of ``w [N, K]``): ``sum (a - zp) w = sum (a - 128) w + (128 - zp) sum w``.
The lowering computes those sums once per layer (``w_colsum``); the launcher computes them only when
not given.

Written like the Triton matmul tutorial: grouped program ids for L2 reuse, masked loads and stores
for any M/N/K, int32 accumulator, epilogue in fp32, output in fp16/bf16/fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qcompiler.lowering.kernels.autotune import Config, gpu_bench, pick_config
from qcompiler.lowering.kernels.grouping import grouped_program_ids

# A small list, keyed on (M, N, K) by pick_config: decode-sized M first, then prefill tiles. Larger
# tiles (128x128 with 8 warps, 128x256) spill registers on sm_80 in this kernel (compile_check), so
# the largest defaults are 64x128 and 128x64.
CONFIGS = [
    Config(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=3),
    Config(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3),
    Config(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    Config(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
]

_OUT_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def int8_gemm_kernel(
    # pointers
    a_ptr, w_ptr, out_ptr, a_scale_ptr, w_scale_ptr, w_colsum_ptr, bias_ptr,
    # sizes
    M, N, K,
    # strides
    stride_am, stride_ak, stride_wn, stride_wk, stride_om, stride_on,
    # activation zero point (uint8 input only)
    a_zero_point,
    # meta-parameters
    A_IS_UINT8: tl.constexpr, A_SCALE_PER_ROW: tl.constexpr, HAS_BIAS: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(axis=0)
    pid_m, pid_n = grouped_program_ids(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N

    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0)
        if A_IS_UINT8:
            # uint8 -> int8 by subtracting 128 (masked zeros become -128 but meet zero weights)
            a = (a.to(tl.int32) - 128).to(tl.int8)
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0)
        acc += tl.dot(a, w, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    if A_IS_UINT8:
        colsum = tl.load(w_colsum_ptr + offs_n, mask=mask_n, other=0)
        acc += (128 - a_zero_point) * colsum[None, :]
    w_scale = tl.load(w_scale_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    out = acc.to(tl.float32) * w_scale[None, :]
    if A_SCALE_PER_ROW:
        out = out * tl.load(a_scale_ptr + offs_m, mask=mask_m, other=0.0).to(tl.float32)[:, None]
    else:
        out = out * tl.load(a_scale_ptr).to(tl.float32)
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on, out.to(OUT_DTYPE),
             mask=mask_m[:, None] & mask_n[None, :])


def int8_gemm(  # long: the launcher's argument checks are one list, each with its message
    a_q: torch.Tensor,
    a_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    a_zero_point: int = 0,
    w_colsum: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    config: Config | None = None,
) -> torch.Tensor:
    """Launcher: checks, allocates ``[M, N]`` and launches ``int8_gemm_kernel``.

    ``a_q [M, K]`` int8 (``a_zero_point`` 0) or uint8; ``a_scale`` one per row ``[M]`` or one ``[1]``;
    ``w_q [N, K]`` int8; ``w_scale [N]``; ``w_colsum [N]`` int32 (computed if not given) for uint8 input.
    Without ``config``, :func:`~qcompiler.lowering.kernels.autotune.pick_config` chooses one (timing
    each on a GPU, on the first call per (M bucket, N, K)).
    """
    if a_q.dim() != 2 or w_q.dim() != 2 or a_q.shape[1] != w_q.shape[1]:
        raise ValueError(f"int8_gemm: a_q {tuple(a_q.shape)} and w_q {tuple(w_q.shape)} must be [M, K] and [N, K]")
    if a_q.dtype not in (torch.int8, torch.uint8) or w_q.dtype != torch.int8:
        raise TypeError(f"int8_gemm: a_q must be int8/uint8 and w_q int8, got {a_q.dtype}, {w_q.dtype}")
    if a_q.dtype == torch.int8 and a_zero_point != 0:
        raise ValueError("int8_gemm: int8 activations are symmetric (a_zero_point 0)")
    if out_dtype not in _OUT_DTYPES:
        raise TypeError(f"int8_gemm: out_dtype must be one of {list(_OUT_DTYPES)}, got {out_dtype}")
    if a_q.device != w_q.device:
        raise ValueError(f"int8_gemm: a_q on {a_q.device} but w_q on {w_q.device}")
    m, k = a_q.shape
    n = w_q.shape[0]
    a_scale = a_scale.reshape(-1).to(torch.float32)
    if a_scale.numel() not in (1, m):
        raise ValueError(f"int8_gemm: a_scale must have 1 or M={m} entries, got {a_scale.numel()}")
    w_scale = w_scale.reshape(-1).to(torch.float32)
    if w_scale.numel() != n:
        raise ValueError(f"int8_gemm: w_scale must have N={n} entries, got {w_scale.numel()}")
    if bias is not None:
        bias = bias.reshape(-1)
        if bias.numel() != n or not bias.is_floating_point():
            raise ValueError(f"int8_gemm: bias must be float with N={n} entries, got {bias.dtype} {tuple(bias.shape)}")
    is_uint8 = a_q.dtype == torch.uint8
    if is_uint8 and w_colsum is None:
        w_colsum = w_q.sum(1, dtype=torch.int32)
    if is_uint8 and (w_colsum.dtype != torch.int32 or w_colsum.numel() != n):
        raise ValueError(f"int8_gemm: w_colsum must be int32 with N={n} entries, got {w_colsum.dtype} "
                         f"{tuple(w_colsum.shape)}")
    out = torch.empty((m, n), dtype=out_dtype, device=a_q.device)
    if m == 0 or n == 0:
        return out
    if config is None:
        bench = gpu_bench(a_q.device, lambda c: int8_gemm(a_q, a_scale, w_q, w_scale, bias, a_zero_point, w_colsum,
                                                          out_dtype, config=c))
        config = pick_config(CONFIGS, m, n, k, bench=bench, name="int8")
    cfg = config
    grid = (triton.cdiv(m, cfg.BLOCK_M) * triton.cdiv(n, cfg.BLOCK_N),)
    int8_gemm_kernel[grid](
        a_q, w_q, out, a_scale, w_scale, w_colsum if is_uint8 else w_scale, bias if bias is not None else w_scale,
        m, n, k,
        a_q.stride(0), a_q.stride(1), w_q.stride(0), w_q.stride(1), out.stride(0), out.stride(1),
        a_zero_point,
        A_IS_UINT8=is_uint8, A_SCALE_PER_ROW=a_scale.numel() == m,
        HAS_BIAS=bias is not None, OUT_DTYPE=_OUT_DTYPES[out_dtype],
        **cfg.meta(),
    )
    return out
