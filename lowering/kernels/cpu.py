"""Fast int8 GEMM on x86 CPUs, with per-token activation scales applied outside the kernel.

Two library kernels take int8 weights prepacked once per layer:

- FBGEMM (``quantized::linear_with_input_q_dq_qweight_dq_output_fp32``): fastest for a few rows
  (decode). It takes float input and a per-tensor (scale, zero point); we hand it rows that are
  already integers (``x_q``) with scale 1 and zero point 128, so it quantizes nothing away and
  accumulates exactly ``sum(x_q * w_q)``; the per-token scale is applied by the caller.
- oneDNN (``onednn::qlinear_pointwise``): far faster for many rows on CPUs with int8 dot-product
  instructions (AVX512-VNNI / AMX). Used for more than :data:`SMALL_M` rows where those exist.

CPUs without VNNI multiply uint8 x int8 into *saturating* int16 pair sums (``vpmaddubsw``). Full-range
int8 weights then give wrong results. :func:`saturates` probes each kernel once with a pair that
overflows int16; where it does, each weight is packed as two parts that add up to it: the weight with
every pair ``(w[2j], w[2j+1])`` shrunk to ``|a| + |b| <= 128`` (:data:`PAIR_LIMIT`; ``255 * 128`` fits
int16), which FBGEMM multiplies exactly, and the excess (zero but for the pairs of two large weights: 2-3%
of SmolLM2's pairs), a sparse float matrix multiplied beside it. The product is the exact integer one, so
the weights stay the recipe's on every CPU (an earlier version shrank them instead, so results and exports
depended on the machine); it costs 36-60% more time per prefill GEMM on SmolLM2's shapes (AMD EPYC Zen 3,
512 rows), and nothing at decode, which runs the C++ GEMV kernels (exact int32 sums on every CPU).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import warnings
import weakref
from dataclasses import dataclass

import torch

SMALL_M = 8  # rows at or below which FBGEMM beats oneDNN (measured on AVX512-VNNI + AMX)
PAIR_LIMIT = 128  # |a| + |b| of adjacent int8 weights, so that 255 * 128 < 2**15
_FBGEMM_ZERO_POINT = 128


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def has_int8_dot() -> bool:
    """AVX512-VNNI or AMX-INT8: int8 dot products accumulate in int32 without saturation."""
    return bool({"avx512_vnni", "amx_int8"} & cpu_flags())


def fbgemm_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


def onednn_available() -> bool:
    return hasattr(torch.ops, "onednn") and hasattr(torch.ops.onednn, "qlinear_pointwise")


@contextlib.contextmanager
def _quantized_engine(name: str):
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def _pack_fbgemm(w_q: torch.Tensor, w_scale: torch.Tensor):
    zero_points = torch.zeros(w_q.shape[0], dtype=torch.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # quantized tensors are deprecated, FBGEMM needs one
        qweight = torch._make_per_channel_quantized_tensor(w_q, w_scale.double(), zero_points, 0)
        with _quantized_engine("fbgemm"):
            return torch.ops.quantized.linear_prepack(qweight, None)


def _pack_onednn(w_q: torch.Tensor):
    return torch.ops.onednn.qlinear_prepack(w_q, None)


@dataclass
class PackedInt8Weight:
    fbgemm: object | None
    onednn: torch.Tensor | None
    w_scale: torch.Tensor
    zero_points: torch.Tensor
    n: int
    k: int
    data_ptr: int = 0  # of the int8 weight it was packed from
    # on saturating CPUs: what the weight exceeds its FBGEMM part by (sparse CSR float32 [N, K] of integers
    # up to 128 in magnitude); None where nothing exceeds
    excess: torch.Tensor | None = None


def _fbgemm_gemm(x_q: torch.Tensor, x_zero_point: int, packed: PackedInt8Weight) -> torch.Tensor:
    # FBGEMM quantizes its float input as round(x / 1.0) + zp into uint8. We give it x_q - zp (exact
    # integers), so it sees x_q itself for uint8 input; int8 input is shifted into uint8 by zp = 128.
    if x_q.dtype == torch.uint8:
        x_in, zp = x_q.to(torch.float32) - x_zero_point, x_zero_point
    else:
        x_in, zp = x_q.to(torch.float32), _FBGEMM_ZERO_POINT
    out = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(x_in, 1.0, zp, packed.fbgemm)
    if packed.excess is not None:
        # FBGEMM's part was packed with scale 1: its output is the integer sum, to which the excess's (integers
        # too, exact in float32 below 2^24) is added before the one multiply by the scale, as FBGEMM rounds
        out = (out + torch.sparse.mm(packed.excess, x_in.t()).t()) * packed.w_scale
    return out


def limit_pair_sums(q: torch.Tensor, limit: int) -> tuple[torch.Tensor, int]:
    """Shrink each pair ``(q[:, 2j], q[:, 2j+1])`` whose ``|a| + |b|`` exceeds ``limit``.

    CPUs without VNNI multiply uint8 x int8 with ``vpmaddubsw``, which adds each pair of products
    into a saturating int16: with activations up to 255, ``255 * (|a| + |b|)`` must stay below 32768,
    so ``|a| + |b| <= 128``. The excess is taken off both magnitudes evenly (the larger gives the odd
    unit), which keeps the pair's direction and changes only the rare pairs of two large weights.
    Returns the new integer tensor and the number of pairs changed. Used to split a weight into what
    FBGEMM multiplies and the excess (:func:`_split_excess`); the weights a recipe quantizes are never
    changed by it.
    """
    n, k = q.shape
    even = k - (k % 2)
    pairs = q[:, :even].to(torch.int32).reshape(n, even // 2, 2)
    mags = pairs.abs()
    excess = (mags.sum(-1) - limit).clamp_min(0)
    changed = int((excess > 0).sum())
    if changed == 0:
        return q, 0
    larger_first = mags[..., 0] >= mags[..., 1]
    cut_big = (excess + 1) // 2
    cut_small = excess // 2
    cut = torch.stack(
        [torch.where(larger_first, cut_big, cut_small), torch.where(larger_first, cut_small, cut_big)], -1
    )
    limited = pairs.sign() * (mags - cut)
    out = q.clone()
    out[:, :even] = limited.reshape(n, even).to(q.dtype)
    return out, changed


def _split_excess(w_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(limited, excess)``: ``w_q`` as a weight FBGEMM multiplies exactly on saturating CPUs (pairs within
    :data:`PAIR_LIMIT`) plus the excess as a sparse CSR float matrix (None where there is none)."""
    limited, changed = limit_pair_sums(w_q, PAIR_LIMIT)
    if changed == 0:
        return w_q, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        return limited, (w_q.to(torch.float32) - limited.to(torch.float32)).to_sparse_csr()


def _onednn_gemm(x_q: torch.Tensor, x_zero_point: int, packed: PackedInt8Weight) -> torch.Tensor:
    if x_q.dtype == torch.int8:
        # oneDNN has a fast kernel only for uint8 activations: int8 ones fall to its reference GEMM,
        # measured ~1800x slower (220 ms for 64x576x576 on AVX512-VNNI). Flipping the sign bit maps
        # int8 v to uint8 v + 128 exactly; zero point 128 takes the 128 back out.
        x_q, x_zero_point = torch.bitwise_xor(x_q.view(torch.uint8), 128), x_zero_point + 128
    return _onednn_qlinear(x_q, x_zero_point, packed)


def _onednn_qlinear(x_u8: torch.Tensor, x_zero_point: int, packed: PackedInt8Weight) -> torch.Tensor:
    return torch.ops.onednn.qlinear_pointwise(
        x_u8, 1.0, x_zero_point, packed.onednn, packed.w_scale, packed.zero_points,
        None, 1.0, 0, torch.float32, "none", [], "",
    )


def _probe_saturation(gemm, pack) -> bool:
    """True when the kernel's int16 pair sums overflow on full-range int8 weights (uint8 input 255)."""
    k = 64
    x_q = torch.zeros(1, k, dtype=torch.uint8)
    x_q[0, :2] = 255
    w_q = torch.zeros(8, k, dtype=torch.int8)
    w_q[:, :2] = 127
    w_scale = torch.ones(8)
    packed = pack(w_q, w_scale)
    out = gemm(x_q, 0, packed)
    return not torch.equal(out, torch.full_like(out, 2 * 255 * 127))


@functools.cache
def saturates() -> bool:
    """Whether any CPU kernel that will be used saturates int16 pair sums (weights are then packed in two
    parts: :func:`_split_excess`)."""
    result = False
    if fbgemm_available():
        result |= _probe_saturation(_fbgemm_gemm, lambda w, s: PackedInt8Weight(
            _pack_fbgemm(w, s), None, s, torch.zeros(w.shape[0], dtype=torch.int64), *w.shape))
    if use_onednn():
        result |= _probe_saturation(_onednn_gemm, lambda w, s: PackedInt8Weight(
            None, _pack_onednn(w), s, torch.zeros(w.shape[0], dtype=torch.int64), *w.shape))
    return result


def use_onednn() -> bool:
    return onednn_available() and has_int8_dot()


def available() -> bool:
    return fbgemm_available()


def describe() -> str:
    if not available():
        return "no FBGEMM on this CPU: int8 GEMM runs the reference"
    large = "oneDNN (VNNI/AMX)" if use_onednn() else "FBGEMM"
    sat = (f"; weight pairs over |a|+|b|={PAIR_LIMIT} multiplied apart in float (int16 saturation)"
           if saturates() else "")
    return f"FBGEMM for <= {SMALL_M} rows, {large} above{sat}"


# --- packed weights, by handle ---------------------------------------------------------------------

_handles = itertools.count(1)
_packed: dict[int, PackedInt8Weight] = {}
_handle_of: dict[int, int] = {}  # id(w_q) -> handle, so recompiles reuse one packing
repacks = 0  # packings done at run time because a handle was unknown


def register_weight(w_q: torch.Tensor, w_scale: torch.Tensor) -> int:
    """Pack an int8 weight ``[N, K]`` once; the returned handle names it in ``qcompiler::int8_gemm``."""
    if w_q.dtype != torch.int8 or w_q.dim() != 2:
        raise ValueError(f"expected int8 [N, K] weights, got {w_q.dtype} {tuple(w_q.shape)}")
    handle = _handle_of.get(id(w_q))
    if handle is not None and handle in _packed:
        return handle
    handle = next(_handles)
    _packed[handle] = _pack(w_q, w_scale)
    _handle_of[id(w_q)] = handle
    weakref.finalize(w_q, _forget, id(w_q), handle)
    return handle


def _forget(ident: int, handle: int) -> None:
    _packed.pop(handle, None)
    if _handle_of.get(ident) == handle:
        del _handle_of[ident]


def _pack(w_q: torch.Tensor, w_scale: torch.Tensor) -> PackedInt8Weight:
    data_ptr = w_q.data_ptr()
    w_q = w_q.contiguous()
    w_scale = w_scale.reshape(-1).to(torch.float32).contiguous()
    fbgemm_w, excess = _split_excess(w_q) if saturates() else (w_q, None)
    return PackedInt8Weight(
        fbgemm=_pack_fbgemm(fbgemm_w, w_scale if excess is None else torch.ones_like(w_scale)),
        onednn=_pack_onednn(w_q) if use_onednn() else None,
        w_scale=w_scale,
        zero_points=torch.zeros(w_q.shape[0], dtype=torch.int64),
        n=w_q.shape[0],
        k=w_q.shape[1],
        data_ptr=data_ptr,
        excess=excess,
    )


def int8_gemm(x_q: torch.Tensor, x_zero_point: int, w_q: torch.Tensor, w_scale: torch.Tensor,
              handle: int) -> torch.Tensor:
    """``((x_q - x_zero_point) @ w_q.T) * w_scale`` for int8 or uint8 ``x_q [..., K]``, the weight packed under ``handle``."""
    global repacks
    packed = _packed.get(handle)
    if packed is None or packed.data_ptr != w_q.data_ptr():
        # The handle does not name this weight (a graph compiled elsewhere): pack now, once.
        repacks += 1
        packed = _packed[handle] = _pack(w_q, w_scale)
    lead = x_q.shape[:-1]
    x2d = x_q.reshape(-1, packed.k)
    if x2d.shape[0] == 0:
        return x_q.new_zeros((*lead, packed.n), dtype=torch.float32)
    if packed.onednn is not None and packed.excess is None and x2d.shape[0] > SMALL_M:
        out = _onednn_gemm(x2d.contiguous(), x_zero_point, packed)
    else:
        out = _fbgemm_gemm(x2d, x_zero_point, packed)
    return out.reshape(*lead, packed.n)


# --- int4 weight-only ------------------------------------------------------------------------------
#
# ATen's CPU int4 kernel (``_weight_int4pack_mm_for_cpu``, the one torchao's int4 weight-only layout
# uses) takes 4-bit integers ``q`` in [0, 15] packed in its own tile order and computes
# ``x @ ((q - 8) * scale + zero).T`` per group, with a float ``zero`` offset. Our format is
# ``(q - z) * s``: the same weight with ``zero = (8 - z) * s``.

INT4_GROUPS = (32, 64, 128, 256)  # group sizes the ATen kernel takes
# Its fp32 path is not vectorized (measured 4-50x slower than bf16 on this machine), so activations,
# scales and offsets go in as bf16; accumulation is fp32 either way.
INT4_COMPUTE_DTYPE = torch.bfloat16


def int4_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


def int4_supported(n: int, k: int, group_size: int) -> str | None:
    """None when the fast CPU int4 kernel takes an ``[n, k]`` weight; otherwise why not."""
    if not int4_available():
        return "this torch build has no CPU int4 kernel"
    if n % 16:
        return f"N={n} output channels is not a multiple of 16 (the CPU int4 kernel's tile)"
    if group_size not in INT4_GROUPS:
        return f"group size {group_size} is not one of {INT4_GROUPS} (the CPU int4 kernel's)"
    if k % group_size:
        return f"K={k} is not a multiple of the group size {group_size}"
    return None


def pack_int4_for_cpu(w_int: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w_int [N, K]`` in [0, 15], ``scale``/``zero [N, K // group]`` (``w = (w_int - zero) * scale``)
    -> the ATen kernel's packed weight and its ``[K // group, N, 2]`` scales-and-offsets in
    :data:`INT4_COMPUTE_DTYPE`, the dtype the kernel computes in."""
    if w_int.dim() != 2 or w_int.numel() and (int(w_int.min()) < 0 or int(w_int.max()) > 15):
        raise ValueError("pack_int4_for_cpu: expected [N, K] integers in [0, 15]")
    if w_int.shape[0] % 16:
        raise ValueError(f"pack_int4_for_cpu: N={w_int.shape[0]} rows is not a multiple of 16 (the kernel's tile)")
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(w_int.to(torch.int32).contiguous(), 1)
    scale = scale.to(torch.float32)
    offset = (8.0 - zero.to(torch.float32)) * scale
    scale_zeros = torch.stack([scale.t(), offset.t()], dim=-1).to(INT4_COMPUTE_DTYPE).contiguous()
    return packed, scale_zeros


def int4_gemm(x: torch.Tensor, packed: torch.Tensor, scale_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """``x [..., K]`` (fp32/bf16/fp16) times the packed weight -> ``[..., N]`` in ``x``'s dtype.

    ``x`` is rounded to the scales' dtype (:data:`INT4_COMPUTE_DTYPE`) on the way in.
    """
    lead, k = x.shape[:-1], x.shape[-1]
    n = scale_zeros.shape[1]
    x2d = x.reshape(-1, k)
    if x2d.shape[0] == 0:
        return x.new_zeros((*lead, n))
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(
        x2d.to(scale_zeros.dtype).contiguous(), packed, group_size, scale_zeros)
    return out.to(x.dtype).reshape(*lead, n)
