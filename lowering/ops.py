"""``qcompiler::`` kernel ops: custom ops with fake implementations and per-device dispatch.

``qcompiler::int8_gemm(x_q, x_zero_point, w_q, w_scale, handle)`` computes
``((x_q - x_zero_point) @ w_q.T) * w_scale``: int8 (zero point 0) or uint8 activations ``[..., K]``
times int8 weights ``[N, K]`` with int32 accumulation, one float scale per output channel, float32
out. ``handle`` names the weight's prepacked form (see ``kernels/cpu.register_weight``); the kernel is
still correct when it names nothing.

``qcompiler::int4_gemm(x, w_packed, scale, zero, group_size)`` computes ``x @ W.T`` for float ``x
[..., K]`` and 4-bit weights packed two per byte (``kernels/triton_int4.pack_int4``) with per-group
``scale``/``zero`` ``[N, K // group_size]``; output in ``x``'s dtype.

``qcompiler::int4_gemm_cpu(x, packed, scale_zeros, group_size)`` is the same product with the weight
in the layout of ATen's CPU int4 kernel (``kernels/cpu.pack_int4_for_cpu``); the lowering packs CPU
weights in that layout once, so the fast CPU path holds one copy of the 4-bit weight.

Dispatch: CUDA -> the Triton kernels (``kernels/triton_int8.py``, ``kernels/triton_int4.py``); CPU ->
FBGEMM/oneDNN for int8 and ATen's int4 kernel (``kernels/cpu.py``), the int4 reference where that
kernel does not take the group size; any other device -> ``kernels/reference.py``. :func:`kernel_for` says which, so the backend's report
names it.
"""

from __future__ import annotations

import torch

from qcompiler.lowering.kernels import cpu, reference


def _check(x_q: torch.Tensor, x_zero_point: int, w_q: torch.Tensor, w_scale: torch.Tensor) -> None:
    if x_q.dtype not in (torch.int8, torch.uint8) or w_q.dtype != torch.int8:
        raise TypeError(f"int8_gemm takes int8/uint8 x_q and int8 w_q, got {x_q.dtype} and {w_q.dtype}")
    if x_q.dtype == torch.int8 and x_zero_point != 0:
        raise ValueError(f"int8 activations are symmetric: x_zero_point must be 0, got {x_zero_point}")
    if not 0 <= x_zero_point <= 255:
        raise ValueError(f"x_zero_point must be in [0, 255], got {x_zero_point}")
    if w_q.dim() != 2 or x_q.shape[-1] != w_q.shape[1]:
        raise ValueError(f"int8_gemm: x_q {tuple(x_q.shape)} does not match w_q {tuple(w_q.shape)} [N, K]")
    if w_scale.numel() != w_q.shape[0]:
        raise ValueError(f"int8_gemm: w_scale has {w_scale.numel()} entries for {w_q.shape[0]} channels")


# Defined with the low-level torch.library API rather than torch.library.custom_op: the op runs once
# per linear layer per token at decode time, and custom_op's Python wrapper costs ~10 us a call
# (measured: 35 us vs 24 us for a 576x576 layer at one row).
_lib = torch.library.Library("qcompiler", "FRAGMENT")
_lib.define("int8_gemm(Tensor x_q, int x_zero_point, Tensor w_q, Tensor w_scale, int handle) -> Tensor")


def _reference_kernel(x_q, x_zero_point, w_q, w_scale, handle):
    _check(x_q, x_zero_point, w_q, w_scale)
    return reference.int8_gemm(x_q, x_zero_point, w_q, w_scale.reshape(-1))


def _cpu_kernel(x_q, x_zero_point, w_q, w_scale, handle):
    _check(x_q, x_zero_point, w_q, w_scale)
    if not cpu.available():
        return reference.int8_gemm(x_q, x_zero_point, w_q, w_scale.reshape(-1))
    return cpu.int8_gemm(x_q, x_zero_point, w_q, w_scale, handle)


def _cuda_kernel(x_q, x_zero_point, w_q, w_scale, handle):
    _check(x_q, x_zero_point, w_q, w_scale)
    from qcompiler.lowering.kernels import triton_int8

    lead = x_q.shape[:-1]
    x2d = x_q.reshape(-1, x_q.shape[-1])
    ones = torch.ones(1, device=x_q.device)
    out = triton_int8.int8_gemm(x2d, ones, w_q, w_scale.reshape(-1), a_zero_point=x_zero_point)
    return out.reshape(*lead, w_q.shape[0])


_lib.impl("int8_gemm", _cpu_kernel, "CPU")
_lib.impl("int8_gemm", _cuda_kernel, "CUDA")


@torch.library.register_fake("qcompiler::int8_gemm", lib=_lib)
def _(x_q, x_zero_point, w_q, w_scale, handle):
    return x_q.new_empty((*x_q.shape[:-1], w_q.shape[0]), dtype=torch.float32)


int8_gemm = torch.ops.qcompiler.int8_gemm.default

_lib.define("int4_gemm(Tensor x, Tensor w_packed, Tensor scale, Tensor zero, int group_size) -> Tensor")


def _int4_check(x, w_packed, scale, zero, group_size):
    if not x.is_floating_point() or w_packed.dtype != torch.uint8:
        raise TypeError(f"int4_gemm takes float x and uint8 packed weights, got {x.dtype} and {w_packed.dtype}")
    if x.shape[-1] != 2 * w_packed.shape[1]:
        raise ValueError(f"int4_gemm: x has K={x.shape[-1]}, the packed weight {2 * w_packed.shape[1]}")
    if group_size < 1 or x.shape[-1] % group_size:
        raise ValueError(f"int4_gemm: K={x.shape[-1]} is not a multiple of group_size={group_size}")
    if scale.shape != (w_packed.shape[0], x.shape[-1] // group_size) or zero.shape != scale.shape:
        raise ValueError(f"int4_gemm: scale and zero must be [N, K // group_size] = "
                         f"{(w_packed.shape[0], x.shape[-1] // group_size)}, got {tuple(scale.shape)}, {tuple(zero.shape)}")


def _int4_reference(x, w_packed, scale, zero, group_size):
    _int4_check(x, w_packed, scale, zero, group_size)
    lead = x.shape[:-1]
    out = reference.int4_gemm(x.reshape(-1, x.shape[-1]), w_packed, scale, zero, group_size)
    return out.reshape(*lead, w_packed.shape[0])


def _int4_cuda(x, w_packed, scale, zero, group_size):
    _int4_check(x, w_packed, scale, zero, group_size)
    from qcompiler.lowering.kernels import triton_int4

    lead = x.shape[:-1]
    out = triton_int4.int4_gemm(x.reshape(-1, x.shape[-1]).contiguous(), w_packed, scale, zero, group_size)
    return out.reshape(*lead, w_packed.shape[0])


_lib.impl("int4_gemm", _int4_reference, "CPU")
_lib.impl("int4_gemm", _int4_cuda, "CUDA")


@torch.library.register_fake("qcompiler::int4_gemm", lib=_lib)
def _(x, w_packed, scale, zero, group_size):
    return x.new_empty((*x.shape[:-1], w_packed.shape[0]))


int4_gemm = torch.ops.qcompiler.int4_gemm.default

_lib.define("int4_gemm_cpu(Tensor x, Tensor packed, Tensor scale_zeros, int group_size) -> Tensor")


def _int4_cpu_kernel(x, packed, scale_zeros, group_size):
    if not x.is_floating_point():
        raise TypeError(f"int4_gemm_cpu takes float activations, got {x.dtype}")
    return cpu.int4_gemm(x, packed, scale_zeros, group_size)


_lib.impl("int4_gemm_cpu", _int4_cpu_kernel, "CPU")


@torch.library.register_fake("qcompiler::int4_gemm_cpu", lib=_lib)
def _(x, packed, scale_zeros, group_size):
    return x.new_empty((*x.shape[:-1], scale_zeros.shape[1]))


int4_gemm_cpu = torch.ops.qcompiler.int4_gemm_cpu.default

# Devices with no kernel of their own run the references (explicitly: kernel_for says so).
_lib.impl("int8_gemm", _reference_kernel, "CompositeExplicitAutograd")
_lib.impl("int4_gemm", lambda x, w, s, z, g: _int4_reference(x, w, s, z, g), "CompositeExplicitAutograd")


def prepare_weight(w_q: torch.Tensor, w_scale: torch.Tensor) -> int:
    """Pack a weight for the kernel of its device; returns the handle for ``int8_gemm``."""
    if w_q.device.type == "cpu" and cpu.available():
        return cpu.register_weight(w_q, w_scale)
    return 0


def int4_cpu_reason(n: int, k: int, group_size: int) -> str | None:
    """None when the fast CPU int4 kernel takes an ``[n, k]`` weight in groups of ``group_size``, else why not."""
    return cpu.int4_supported(n, k, group_size)


def kernel_for(device: torch.device, weight_bits: int = 8, why_not_fast: str | None = None) -> str:
    """The kernel a layer runs on ``device``; ``why_not_fast`` names why the fast one does not apply."""
    if weight_bits <= 4:
        if device.type == "cuda":
            return "Triton int4 GEMM (dequantize in registers, split-K for small M)"
        if device.type == "cpu" and why_not_fast is None:
            return "ATen CPU int4 kernel (_weight_int4pack_mm_for_cpu, bf16 activations)"
        return f"int4 reference: unpack, dequantize, fp32 matmul ({why_not_fast or 'no ' + device.type + ' kernel'})"
    if device.type == "cpu":
        return cpu.describe()
    if device.type == "cuda":
        return "Triton int8 GEMM (int32 tensor-core accumulation)"
    return f"reference int8 GEMM on {device.type} (no {device.type} kernel)"


def int8_pair_limit(device: torch.device) -> int | None:
    """The weight-pair limit the int8 kernel of ``device`` needs, if its int16 sums saturate."""
    if device.type == "cpu" and cpu.available() and cpu.saturates():
        return cpu.PAIR_LIMIT
    return None
