"""INT4 weight-only GEMM in Triton: fp16/bf16/fp32 activations x packed 4-bit weights.

Packed format (``reference.pack_int4``): weight integers in [0, 15] (asymmetric, or symmetric stored as q + 8),
two per byte along K: byte ``j`` of row ``n`` holds ``w[n, 2j]`` in its low nibble and ``w[n, 2j+1]``
in its high nibble. Per-group ``scale`` and ``zero`` ``[N, K // group]`` (zero in the same units as
the stored integers), so ``w_float = (w_int - zero) * scale``.

The kernel dequantizes a ``[BLOCK_K, BLOCK_N]`` tile in registers with its group's scales and zeros
(a K tile never straddles two groups) and accumulates ``a @ w`` in fp32, as two dots: even columns of
``a`` with the low nibbles, odd columns with the high nibbles, so nothing is interleaved. ``SPLIT_K > 1`` (the batch-1 / GEMV configuration) gives
each program a slice of K and writes a partial sum; the launcher adds the partials.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import triton
import triton.language as tl

from qcompiler.lowering.kernels.autotune import Config, gpu_bench, interpreting, pick_config
from qcompiler.lowering.kernels.grouping import grouped_program_ids
from qcompiler.lowering.kernels.reference import pack_int4, unpack_int4  # noqa: F401  (the format's home)

CONFIGS = [
    # batch-1 decode: skinny M tile, K split across programs to fill the GPU
    Config(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=4, SPLIT_K=8),
    Config(BLOCK_M=16, BLOCK_N=128, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=3, SPLIT_K=4),
    # prefill (no register spills on sm_80/sm_90 in compile_check, with the fp32 scales and zeros the
    # lowering stores; 64x128 with 4 warps spills 28 bytes on sm_80, hence 8)
    Config(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3),
    Config(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
]

_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
MIN_BLOCK_K = 32  # the smallest K tile the kernel's dots take


def unsupported_reason(n: int, k: int, group_size: int, configs: list[Config] = CONFIGS) -> str | None:
    """None when every config of ``configs`` takes an ``[n, k]`` weight in groups of ``group_size``
    (a per-channel weight is one group of ``k``); otherwise why not. The lowering asks at prepare
    time, so a layer the kernel cannot take runs the reference instead of failing at run time."""
    if k % 2:
        return f"K={k} is odd: two 4-bit weights are packed per byte"
    if group_size < 2 or k % group_size:
        return f"K={k} is not a multiple of the group size {group_size}"
    smallest = min(math.gcd(cfg.BLOCK_K, group_size) for cfg in configs)
    if smallest < MIN_BLOCK_K:
        what = f"per-channel K={k}" if group_size == k else f"group size {group_size}"
        return (f"{what} is not a multiple of {MIN_BLOCK_K} (a K tile of the Triton int4 kernel lies in one "
                f"group and is at least {MIN_BLOCK_K} wide)")
    return None


@triton.jit
def int4_gemm_kernel(
    # pointers
    a_ptr, w_ptr, scale_ptr, zero_ptr, bias_ptr, out_ptr,
    # sizes
    M, N, K,
    # strides (w in bytes along K // 2; out has a leading split dimension)
    stride_am, stride_ak, stride_wn, stride_wk, stride_sn, stride_sg, stride_os, stride_om, stride_on,
    # meta-parameters
    GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    # BLOCK_K divides GROUP, so a K tile lies in one quantization group: its scales and zeros are
    # [BLOCK_N] vectors. The low nibbles hold even k and the high nibbles odd k, so the tile is two
    # dots of BLOCK_K // 2: even columns of `a` with the low nibbles, odd columns with the high ones.
    pid = tl.program_id(axis=0)
    pid_k = tl.program_id(axis=1)
    pid_m, pid_n = grouped_program_ids(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_half = tl.arange(0, BLOCK_K // 2)
    mask_m = offs_m < M
    mask_n = offs_n < N
    k_tiles = K // BLOCK_K
    tiles_per_split = tl.cdiv(k_tiles, SPLIT_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tile in range(pid_k * tiles_per_split, tl.minimum((pid_k + 1) * tiles_per_split, k_tiles)):
        byte = tile * (BLOCK_K // 2) + offs_half
        a_even = tl.load(a_ptr + offs_m[:, None] * stride_am + (2 * byte)[None, :] * stride_ak,
                         mask=mask_m[:, None], other=0.0).to(tl.float32)
        a_odd = tl.load(a_ptr + offs_m[:, None] * stride_am + (2 * byte + 1)[None, :] * stride_ak,
                        mask=mask_m[:, None], other=0.0).to(tl.float32)
        packed = tl.load(w_ptr + byte[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                         mask=mask_n[None, :], other=0)
        g = (tile * BLOCK_K) // GROUP
        scale = tl.load(scale_ptr + offs_n * stride_sn + g * stride_sg, mask=mask_n, other=0.0).to(tl.float32)
        zero = tl.load(zero_ptr + offs_n * stride_sn + g * stride_sg, mask=mask_n, other=0.0).to(tl.float32)
        w_low = ((packed & 0xF).to(tl.float32) - zero[None, :]) * scale[None, :]
        w_high = ((packed >> 4).to(tl.float32) - zero[None, :]) * scale[None, :]
        acc += tl.dot(a_even.to(DOT_DTYPE), w_low.to(DOT_DTYPE), out_dtype=tl.float32)
        acc += tl.dot(a_odd.to(DOT_DTYPE), w_high.to(DOT_DTYPE), out_dtype=tl.float32)

    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on, acc,
             mask=mask_m[:, None] & mask_n[None, :])


def int4_gemm(
    a: torch.Tensor,
    w_packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    config: Config | None = None,
) -> torch.Tensor:
    """Launcher: ``a [M, K]`` float x packed weight ``[N, K // 2]`` -> ``[M, N]`` in ``a``'s dtype."""
    if a.dim() != 2 or w_packed.dim() != 2:
        raise ValueError(f"int4_gemm: a {tuple(a.shape)} and w_packed {tuple(w_packed.shape)} must be 2-D")
    if a.dtype not in _DTYPES:
        raise TypeError(f"int4_gemm: activations must be fp32/fp16/bf16, got {a.dtype}")
    if w_packed.dtype != torch.uint8:
        raise TypeError(f"int4_gemm: w_packed must be uint8 (two 4-bit values per byte), got {w_packed.dtype}")
    m, k = a.shape
    n = w_packed.shape[0]
    if w_packed.shape[1] * 2 != k:
        raise ValueError(f"int4_gemm: w_packed has {w_packed.shape[1] * 2} weights per row, a has K={k}")
    if group_size < 2 or k % group_size:
        raise ValueError(
            f"int4_gemm: K={k} is not a multiple of group_size={group_size}; pad K or choose a group size "
            "that divides it"
        )
    if scale.shape != (n, k // group_size) or zero.shape != scale.shape:
        raise ValueError(f"int4_gemm: scale and zero must be [N, K // group] = {(n, k // group_size)}, "
                         f"got {tuple(scale.shape)} and {tuple(zero.shape)}")
    if len({a.device, w_packed.device, scale.device, zero.device}) != 1:
        raise ValueError("int4_gemm: all tensors must be on one device")
    if bias is not None:
        bias = bias.reshape(-1)
        if bias.numel() != n:
            raise ValueError(f"int4_gemm: bias must have N={n} entries, got {tuple(bias.shape)}")
    if config is None and not (m and n):
        config = CONFIGS[0]  # nothing to launch: do not time (and cache a choice for) an empty problem
    if config is None:
        bench = gpu_bench(a.device, lambda c: int4_gemm(a, w_packed, scale, zero, group_size, bias, config=c))
        config = pick_config(CONFIGS, m, n, k, bench=bench, name=f"int4 g{group_size}")
    cfg = config
    # a K tile must lie inside one group (and K is a whole number of groups, so of tiles)
    block_k = math.gcd(cfg.BLOCK_K, group_size)
    if block_k < MIN_BLOCK_K:
        raise ValueError(f"int4_gemm: group_size={group_size} and BLOCK_K={cfg.BLOCK_K} leave a K tile of "
                         f"{block_k}; use group sizes that are multiples of 32")
    cfg = dataclasses.replace(cfg, BLOCK_K=block_k)
    partial = torch.empty((cfg.SPLIT_K, m, n), dtype=torch.float32, device=a.device)
    if m and n:
        grid = (triton.cdiv(m, cfg.BLOCK_M) * triton.cdiv(n, cfg.BLOCK_N), cfg.SPLIT_K)
        int4_gemm_kernel[grid](
            a, w_packed, scale, zero, bias if bias is not None else scale, partial,
            m, n, k,
            a.stride(0), a.stride(1), w_packed.stride(0), w_packed.stride(1), scale.stride(0), scale.stride(1),
            partial.stride(0), partial.stride(1), partial.stride(2),
            GROUP=group_size, HAS_BIAS=bias is not None,
            DOT_DTYPE=tl.float32 if (a.dtype == torch.float32 or interpreting()) else _DTYPES[a.dtype],
            SPLIT_K=cfg.SPLIT_K, **cfg.meta(),
        )
    out = partial[0] if cfg.SPLIT_K == 1 else partial.sum(0)
    return out.to(a.dtype)
