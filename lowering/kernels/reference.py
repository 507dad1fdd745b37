"""Pure-torch reference implementations of the ``qcompiler::`` kernels. Slow, exact, any device."""

from __future__ import annotations

import torch

# float64 holds every int32 accumulator exactly while K * 127 * 127 < 2**53.
_MAX_EXACT_K = 2**53 // (128 * 128)


def int8_gemm(x_q: torch.Tensor, x_zero_point: int, w_q: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """``((x_q - x_zero_point) @ w_q.T) * w_scale`` with exact integer accumulation, as float32 ``[..., N]``."""
    k = x_q.shape[-1]
    if k > _MAX_EXACT_K:
        raise ValueError(f"K={k} is too large for the exact float64 reference (max {_MAX_EXACT_K})")
    acc = (x_q.to(torch.float64) - x_zero_point) @ w_q.to(torch.float64).t()
    return acc.to(torch.float32) * w_scale.to(torch.float32)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` integers in [0, 15] -> ``[N, K // 2]`` uint8: byte ``j`` holds ``q[:, 2j]`` in its low
    nibble and ``q[:, 2j + 1]`` in its high nibble (K even)."""
    if q.dim() != 2 or q.shape[1] % 2:
        raise ValueError(f"pack_int4: expected [N, K] with K even, got {tuple(q.shape)}")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > 15):
        raise ValueError("pack_int4: values must lie in [0, 15] (store symmetric int4 as q + 8)")
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """``[N, K // 2]`` uint8, two 4-bit values per byte (low nibble first) -> ``[N, K]`` uint8 in [0, 15]."""
    low, high = packed & 0xF, packed >> 4
    return torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1)


INT4_TILE = 32  # output channels per tile of the tiled int4 layout (64 bytes, a cache line, per 4 input channels)


def pack_int4_tiled(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
    """``q [N, K]`` integers in [0, 15] with per-group ``scale``/``zero [N, G]`` -> the layout of the C++
    ``qcompiler::int4_gemv_tiled`` (N a multiple of 32, K of 4): ``[N / 32, 16 K]`` uint8, where tile ``t``
    holds, for each step ``s`` of 4 input channels (``k = 4 s``) and each of its 32 rows ``r``, the bytes
    ``q[r, k] | q[r, k + 2] << 4`` and ``q[r, k + 1] | q[r, k + 3] << 4``; and ``scale``/``zero`` as
    ``[N / 32, G, 32]``. Stacking layers along dim 0 stacks their output channels, as for :func:`pack_int4`."""
    n, k = q.shape
    if q.dim() != 2 or n % INT4_TILE or k % 4:
        raise ValueError(f"pack_int4_tiled: expected [N, K] with N a multiple of {INT4_TILE} and K of 4, "
                         f"got {tuple(q.shape)}")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > 15):
        raise ValueError("pack_int4_tiled: values must lie in [0, 15] (store symmetric int4 as q + 8)")
    steps = q.to(torch.uint8).reshape(n // INT4_TILE, INT4_TILE, k // 4, 4)  # [T, r, s, j]
    pairs = torch.stack([steps[..., 0] | (steps[..., 2] << 4), steps[..., 1] | (steps[..., 3] << 4)], dim=-1)
    tiled = pairs.permute(0, 2, 1, 3).reshape(n // INT4_TILE, INT4_TILE * k // 2).contiguous()

    def per_tile(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.float32).reshape(n // INT4_TILE, INT4_TILE, -1).transpose(1, 2).contiguous()

    return tiled, per_tile(scale), per_tile(zero)


def unpack_int4_tiled(tiled: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pack_int4_tiled` for the weights: ``[N / 32, 16 K]`` -> ``[N, K]`` uint8."""
    tiles, width = tiled.shape
    pairs = tiled.reshape(tiles, width // (2 * INT4_TILE), INT4_TILE, 2).permute(0, 2, 1, 3)  # [T, r, s, 2]
    lo, hi = pairs & 0xF, pairs >> 4
    return torch.stack([lo[..., 0], lo[..., 1], hi[..., 0], hi[..., 1]], dim=-1).reshape(tiles * INT4_TILE, -1)


def int4_gemm(a: torch.Tensor, w_packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
              group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``a [M, K] @ W.T`` with ``W = (unpack(w_packed) - zero) * scale`` per group, in fp32; ``a``'s dtype out."""
    w_int = unpack_int4(w_packed).to(torch.float32)
    n, k = w_int.shape
    groups = w_int.reshape(n, k // group_size, group_size)
    w = ((groups - zero.float()[..., None]) * scale.float()[..., None]).reshape(n, k)
    out = a.float() @ w.t()
    if bias is not None:
        out = out + bias.float()
    return out.to(a.dtype)
