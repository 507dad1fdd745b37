"""Quantization math, written once.

Every granularity is one ``block_size``: a tuple with one entry per dimension of the tensor, where each
entry is the length of a quantization block along that dimension and ``-1`` means "the whole
dimension". One scale (and zero point) is kept per block.

==================  ===========================  ===========================
granularity         weight ``[N, K]``            activation ``[..., T, K]``
==================  ===========================  ===========================
per-tensor          ``(-1, -1)``                 ``(-1, ..., -1, -1)``
per-channel (axis)  ``(1, -1)`` for axis 0       --
per-group (g)       ``(1, g)``                   --
per-token           --                           ``(1, ..., 1, -1)``
==================  ===========================  ===========================

Integer ranges: symmetric quantization uses the restricted signed range ``[-(2^(b-1)-1), 2^(b-1)-1]``
(int8: [-127, 127]) with zero point 0 and ``scale = absmax / qmax``; asymmetric quantization uses
``[0, 2^b - 1]`` with ``scale = (max - min) / (qmax - qmin)`` over a range widened to include 0, so 0 is
exactly representable. Rounding is round-half-to-even (``torch.round``).

Zero points come in two kinds, told apart by their dtype. An *integer* zero point (activations, GPTQ's
grids, what integer kernels take) is added after rounding: ``round(x / scale) + zero_point``. A *float*
zero point (asymmetric weights of RTN, HQQ and AWQ, what the int4 kernels take: the block's minimum
lands exactly on ``qmin``) is added before: ``round(x / scale + zero_point)``. Dequantization is
``(q - zero_point) * scale`` for both.

The math lives in the plain functions ``*_math`` (traceable, used by the lowering so Inductor can fuse
it); the public functions call the ``qcompiler::`` custom ops, which check their input and survive
tracing as single graph nodes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

# Smallest scale handed out. A block of zeros gets this scale (and quantizes to zero) instead of 0,
# which would divide by zero; it is small enough never to clip a real value that is not itself tiny.
MIN_SCALE = 1e-12

SUPPORTED_BITS = range(2, 9)


def quant_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer range ``(qmin, qmax)`` for ``bits`` bits (2..8)."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be between 2 and 8, got {bits}")
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        return -qmax, qmax
    return 0, 2**bits - 1


def storage_dtype(qmin: int, qmax: int) -> torch.dtype:
    """The narrowest integer dtype that holds ``[qmin, qmax]``."""
    if qmin >= 0 and qmax <= 255:
        return torch.uint8
    if qmin >= -128 and qmax <= 127:
        return torch.int8
    return torch.int32


def _resolve_block_size(shape: Sequence, block_size: Sequence[int]) -> list:
    if len(block_size) != len(shape):
        raise ValueError(
            f"block_size {tuple(block_size)} has {len(block_size)} entries but the tensor has "
            f"{len(shape)} dimensions {tuple(shape)}: give one block length (or -1) per dimension"
        )
    resolved = []
    for dim, (size, block) in enumerate(zip(shape, block_size)):
        if block == -1:
            resolved.append(size)
            continue
        if block < 1:
            raise ValueError(f"block_size[{dim}] must be -1 or a positive length, got {block}")
        if size % block != 0:
            raise ValueError(
                f"dimension {dim} of size {size} is not a multiple of its block length {block}: "
                f"choose a group size that divides {size}"
            )
        resolved.append(block)
    return resolved


def blocked_shapes(shape: Sequence, block_size: Sequence[int]) -> tuple[list, list, list]:
    """Shapes to view a tensor as interleaved (blocks, block) dims, and the scale's shape."""
    blocks = _resolve_block_size(shape, block_size)
    blocked, scale_broadcast, scale_shape = [], [], []
    for size, block in zip(shape, blocks):
        n_blocks = size // block
        blocked += [n_blocks, block]
        scale_broadcast += [n_blocks, 1]
        scale_shape.append(n_blocks)
    return blocked, scale_broadcast, scale_shape


def scale_shape(shape: Sequence[int], block_size: Sequence[int]) -> list[int]:
    """Shape of the scale/zero-point tensors for a tensor of ``shape`` quantized by ``block_size``."""
    return blocked_shapes(shape, block_size)[2]


def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """The float type quantization arithmetic runs in for tensors of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _shape_free_kind(block_size: Sequence[int]) -> str | None:
    """"token" or "tensor" when the blocks need no reshaping (scales broadcast against x as is)."""
    if all(b == -1 for b in block_size):
        return "tensor"
    if block_size[-1] == -1 and all(b == 1 for b in block_size[:-1]):
        return "token"
    return None


def _min_max(x: torch.Tensor, block_size: Sequence[int], want_min: bool):
    """Per-block (absmax,) or (min, max), shaped to broadcast against the blocked or plain tensor."""
    kind = _shape_free_kind(block_size)
    if kind == "token":
        xb, dims, out_shape = x, (-1,), None
    elif kind == "tensor":
        xb, dims, out_shape = x, tuple(range(len(block_size))), [1] * len(block_size)
    else:
        blocked, _, out_shape = blocked_shapes(x.shape, block_size)
        xb, dims = x.reshape(blocked), tuple(range(1, 2 * len(block_size), 2))
    keep = kind == "token"
    if want_min:
        stats = (xb.amin(dim=dims, keepdim=keep), xb.amax(dim=dims, keepdim=keep))
    else:
        stats = (xb.abs().amax(dim=dims, keepdim=keep),)
    return tuple(s if out_shape is None else s.reshape(out_shape) for s in stats)


def choose_qparams_math(
    x: torch.Tensor, block_size: Sequence[int], qmin: int, qmax: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32) and zero point (int32), one per block, from the block's min and max.

    Scales have the shape :func:`scale_shape` gives (for per-token ``[..., T, 1]``).
    """
    if len(block_size) == 0:
        raise ValueError("block_size must have one entry per dimension of a tensor with at least one")
    xf = x.detach().to(torch.float32)
    if symmetric:
        (absmax,) = _min_max(xf, block_size, want_min=False)
        return qparams_from_range(-absmax, absmax, qmin, qmax, True)
    lo, hi = _min_max(xf, block_size, want_min=True)
    return qparams_from_range(lo, hi, qmin, qmax, False)


def qparams_from_range(
    lo: torch.Tensor, hi: torch.Tensor, qmin: int, qmax: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32) and zero point (int32) that map ``[lo, hi]`` (widened to include 0) onto ``[qmin, qmax]``."""
    lo, hi = lo.to(torch.float32), hi.to(torch.float32)
    if symmetric:
        absmax = torch.maximum(lo.abs(), hi.abs())
        scale = (absmax / ((qmax - qmin) / 2)).clamp_min(MIN_SCALE)
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    lo, hi = lo.clamp_max(0.0), hi.clamp_min(0.0)
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(MIN_SCALE)
    zero_point = (qmin - torch.round(lo / scale)).clamp(qmin, qmax).to(torch.int32)
    return scale, zero_point


def quantize_math(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    block_size: Sequence[int],
    qmin: int,
    qmax: int,
    dtype: torch.dtype,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``clamp(round(x / scale) + zero_point, qmin, qmax)`` per block, stored as ``dtype``; with a float
    ``zero_point``, ``clamp(round(x / scale + zero_point), qmin, qmax)`` (see the module docstring).

    Computed in ``compute_dtype``; by default float32, or float64 for float64 input.
    """
    xf = x.to(compute_dtype or compute_dtype_for(x.dtype))
    float_zero = isinstance(zero_point, torch.Tensor) and zero_point.is_floating_point()
    if _shape_free_kind(block_size) is None:
        blocked, broadcast, _ = blocked_shapes(x.shape, block_size)
        xf, scale = xf.reshape(blocked), scale.reshape(broadcast)
        if isinstance(zero_point, torch.Tensor):
            zero_point = zero_point.reshape(broadcast)
    if float_zero:
        q = torch.round(xf / scale + zero_point)
    else:
        q = torch.round(xf / scale)
        if zero_point is not None:
            q = q + zero_point
    return q.clamp(qmin, qmax).reshape(x.shape).to(dtype)


def dequantize_math(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    block_size: Sequence[int],
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``(q - zero_point) * scale`` per block, as ``out_dtype`` (computed in float64 for float64 out)."""
    qf = q.to(compute_dtype_for(out_dtype))
    if _shape_free_kind(block_size) is not None:
        if zero_point is not None:
            qf = qf - zero_point
        return (qf * scale).to(out_dtype)
    blocked, broadcast, _ = blocked_shapes(q.shape, block_size)
    qb = qf.reshape(blocked)
    if zero_point is not None:
        qb = qb - zero_point.reshape(broadcast)
    return (qb * scale.reshape(broadcast)).reshape(q.shape).to(out_dtype)


# --- custom ops: single graph nodes with checked inputs -------------------------------------------


def check_finite(x: torch.Tensor, what: str) -> None:
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).sum().item()
        raise ValueError(
            f"{what}: the tensor holds {bad} inf/NaN value(s) out of {x.numel()}; a quantization range "
            "cannot be chosen from them. Find where they come from (an overflowing layer, a bad "
            "checkpoint) or keep this layer in float with the recipe's skip list."
        )


@torch.library.custom_op("qcompiler::choose_qparams", mutates_args=())
def _choose_qparams_op(
    x: torch.Tensor, block_size: list[int], qmin: int, qmax: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    check_finite(x, "choose_qparams")
    return choose_qparams_math(x, block_size, qmin, qmax, symmetric)


@_choose_qparams_op.register_fake
def _(x, block_size, qmin, qmax, symmetric):
    shape = scale_shape(x.shape, block_size)
    return x.new_empty(shape, dtype=torch.float32), x.new_empty(shape, dtype=torch.int32)


@torch.library.custom_op("qcompiler::quantize", mutates_args=())
def _quantize_op(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    block_size: list[int],
    qmin: int,
    qmax: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    return quantize_math(x, scale, zero_point, block_size, qmin, qmax, dtype)


@_quantize_op.register_fake
def _(x, scale, zero_point, block_size, qmin, qmax, dtype):
    _resolve_block_size(x.shape, block_size)
    return x.new_empty(x.shape, dtype=dtype)


@torch.library.custom_op("qcompiler::dequantize", mutates_args=())
def _dequantize_op(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    block_size: list[int],
    out_dtype: torch.dtype,
) -> torch.Tensor:
    return dequantize_math(q, scale, zero_point, block_size, out_dtype)


@_dequantize_op.register_fake
def _(q, scale, zero_point, block_size, out_dtype):
    _resolve_block_size(q.shape, block_size)
    return q.new_empty(q.shape, dtype=out_dtype)


def choose_qparams(
    x: torch.Tensor, block_size: Sequence[int], bits: int = 8, symmetric: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per block of ``x`` (min-max range). Raises on inf/NaN."""
    qmin, qmax = quant_range(bits, symmetric)
    return torch.ops.qcompiler.choose_qparams(x, list(block_size), qmin, qmax, symmetric)


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    block_size: Sequence[int],
    bits: int = 8,
    symmetric: bool = True,
) -> torch.Tensor:
    qmin, qmax = quant_range(bits, symmetric)
    return torch.ops.qcompiler.quantize(
        x, scale, zero_point, list(block_size), qmin, qmax, storage_dtype(qmin, qmax)
    )


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    block_size: Sequence[int],
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    return torch.ops.qcompiler.dequantize(q, scale, zero_point, list(block_size), out_dtype)


def fake_quantize_math(x: torch.Tensor, block_size: Sequence[int], qmin: int, qmax: int, symmetric: bool,
                       scale: torch.Tensor | None = None, zero_point: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize then dequantize ``x`` in its own dtype (plain torch math, no custom ops): the min-max
    range of each block, or the given ``scale``/``zero_point``. What the integer path computes."""
    if scale is None:
        scale, zero_point = choose_qparams_math(x, block_size, qmin, qmax, symmetric)
    zero_point = None if symmetric else zero_point
    q = quantize_math(x, scale, zero_point, block_size, qmin, qmax, torch.int32,
                      compute_dtype=compute_dtype_for(x.dtype))
    return dequantize_math(q, scale, zero_point, block_size, x.dtype)


def fake_quantize(
    x: torch.Tensor, block_size: Sequence[int], bits: int = 8, symmetric: bool = True
) -> torch.Tensor:
    """Quantize then dequantize with a min-max range: what the integer path computes, in float."""
    scale, zero_point = choose_qparams(x, block_size, bits, symmetric)
    q = quantize(x, scale, zero_point, block_size, bits, symmetric)
    return dequantize(q, scale, zero_point, block_size, x.dtype)


# --- granularities ----------------------------------------------------------------------------------


def per_tensor(ndim: int) -> tuple[int, ...]:
    return (-1,) * ndim


def per_channel(ndim: int, axis: int = 0) -> tuple[int, ...]:
    axis = axis % ndim
    return tuple(1 if d == axis else -1 for d in range(ndim))


def per_group(ndim: int, group_size: int) -> tuple[int, ...]:
    """One scale per ``group_size`` consecutive elements along the last (input) dimension."""
    if group_size < 1:
        raise ValueError(f"group_size must be positive, got {group_size}")
    return (1,) * (ndim - 1) + (group_size,)


def per_token(ndim: int) -> tuple[int, ...]:
    """One scale per row of the last dimension (each token of a [..., T, K] activation)."""
    return (1,) * (ndim - 1) + (-1,)


def bits_per_weight(
    shape: Sequence[int],
    block_size: Sequence[int],
    bits: int,
    scale_bits: int = 16,
    zero_point_bits: int = 0,
) -> float:
    """Storage cost per weight, including one scale (and zero point) per block.

    ``bits_per_weight((4096, 4096), per_group(2, 128), 4, scale_bits=16, zero_point_bits=8)`` is
    ``4 + (16 + 8) / 128 = 4.1875``.
    """
    n_blocks = math.prod(scale_shape(shape, block_size))
    numel = math.prod(shape)
    if numel == 0:
        raise ValueError("bits_per_weight of an empty tensor is undefined")
    return (numel * bits + n_blocks * (scale_bits + zero_point_bits)) / numel
