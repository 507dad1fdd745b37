"""``qcompiler::`` kernel ops: custom ops with fake implementations and per-device dispatch.

``qcompiler::int8_gemm(x_q, x_zero_point, w_q, w_scale, handle)`` computes
``((x_q - x_zero_point) @ w_q.T) * w_scale``: int8 (zero point 0) or uint8 activations ``[..., K]``
times int8 weights ``[N, K]`` with int32 accumulation, one float scale per output channel, float32
out. ``handle`` names the weight's prepacked form (see ``kernels/cpu.register_weight``); the kernel is
still correct when it names nothing. The CUDA lowering calls ``int8_linear`` instead; ``int8_gemm`` on
CUDA (direct calls, benchmarks) sums the weight's rows on every uint8 call.

``qcompiler::int4_gemm(x, w_packed, scale, zero, group_size)`` computes ``x @ W.T`` for float ``x
[..., K]`` and 4-bit weights packed two per byte (``kernels/reference.pack_int4``) with per-group
``scale``/``zero`` ``[N, K // group_size]``; output in ``x``'s dtype.

``qcompiler::int4_gemm_cpu(x, packed, scale_zeros, group_size)`` is the same product with the weight
in the layout of ATen's CPU int4 kernel (``kernels/cpu.pack_int4_for_cpu``); the lowering packs CPU
weights in that layout once, so the fast CPU path holds one copy of the 4-bit weight.

``qcompiler::int4_gemm_reference`` is ``int4_gemm`` computed by the reference on every device: the
lowering calls it for layers the device's kernel does not take (:func:`int4_cpu_reason`,
:func:`triton_int4_reason`), so the routing is explicit in the graph and decided at prepare time.

The CUDA lowering of W8A8 layers uses two more ops, so that nothing runs between the Triton kernels:

``qcompiler::quantize_per_token(x, smooth)`` returns ``(x_q, x_scale)``: ``x [..., K]`` (divided by
the SmoothQuant ``smooth [K]`` when given) quantized per token to int8 with an fp32 scale ``[..., 1]``,
bit for bit the arithmetic of ``qcompiler.core.primitives`` on ``x`` upcast to fp32.

``qcompiler::int8_linear(x_q, x_scale, x_zero_point, w_q, w_scale, w_colsum, bias, out_dtype)``
computes ``((x_q - x_zero_point) @ w_q.T) * w_scale * x_scale + bias`` in ``out_dtype`` (fp16/bf16/
fp32), with ``x_scale`` one per row ``[..., 1]`` or one for the tensor; ``w_colsum`` (the weight's
int32 row sums, precomputed by the lowering) serves the zero-point correction of uint8 activations.

Dispatch: CUDA -> the Triton kernels (``kernels/triton_int8.py``, ``kernels/triton_int4.py``,
``kernels/triton_quant.py``); CPU -> FBGEMM/oneDNN for int8 and ATen's int4 kernel
(``kernels/cpu.py``); ``quantize_per_token`` and ``int8_linear`` on CPU, and every op on any other
device -> the pure-torch references (``kernels/reference.py``, ``qcompiler.core.primitives``).
:func:`kernel_for` says which, so the backend's report names it.
"""

from __future__ import annotations

import torch

from qcompiler.core import primitives
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

_lib.define("int4_gemm_reference(Tensor x, Tensor w_packed, Tensor scale, Tensor zero, int group_size) -> Tensor")
_lib.impl("int4_gemm_reference", lambda x, w, s, z, g: _int4_reference(x, w, s, z, g), "CompositeExplicitAutograd")


@torch.library.register_fake("qcompiler::int4_gemm_reference", lib=_lib)
def _(x, w_packed, scale, zero, group_size):
    return x.new_empty((*x.shape[:-1], w_packed.shape[0]))


int4_gemm_reference = torch.ops.qcompiler.int4_gemm_reference.default

# --- the CUDA W8A8 lowering: fused per-token quantization and int8 GEMM with its epilogue ------------

_lib.define("quantize_per_token(Tensor x, Tensor? smooth) -> (Tensor, Tensor)")


def _quantize_check(x, smooth):
    if not x.is_floating_point() or x.dim() < 1 or x.shape[-1] < 1:
        raise TypeError(f"quantize_per_token takes float x [..., K] with K >= 1, got {x.dtype} {tuple(x.shape)}")
    if smooth is not None and (smooth.numel() != x.shape[-1] or not smooth.is_floating_point()):
        raise ValueError(f"quantize_per_token: smooth must be float with K={x.shape[-1]} entries, got "
                         f"{smooth.dtype} {tuple(smooth.shape)}")


def _quantize_per_token_reference(x, smooth):
    _quantize_check(x, smooth)
    xf = x.to(torch.float32)
    if smooth is not None:
        xf = xf / smooth.reshape(-1).to(torch.float32)
    block = primitives.per_token(x.dim())
    qmin, qmax = primitives.quant_range(8, symmetric=True)
    x_scale, _ = primitives.choose_qparams_math(xf, block, qmin, qmax, True)
    return primitives.quantize_math(xf, x_scale, None, block, qmin, qmax, torch.int8), x_scale


def _quantize_per_token_cuda(x, smooth):
    _quantize_check(x, smooth)
    from qcompiler.lowering.kernels import triton_quant

    x_q, x_scale = triton_quant.quantize_per_token(x.reshape(-1, x.shape[-1]), smooth)
    return x_q.reshape(x.shape), x_scale.reshape(*x.shape[:-1], 1)


_lib.impl("quantize_per_token", _quantize_per_token_reference, "CPU")
_lib.impl("quantize_per_token", _quantize_per_token_cuda, "CUDA")
_lib.impl("quantize_per_token", _quantize_per_token_reference, "CompositeExplicitAutograd")


@torch.library.register_fake("qcompiler::quantize_per_token", lib=_lib)
def _(x, smooth):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


quantize_per_token = torch.ops.qcompiler.quantize_per_token.default

_lib.define("int8_linear(Tensor x_q, Tensor x_scale, int x_zero_point, Tensor w_q, Tensor w_scale, Tensor? w_colsum, "
            "Tensor? bias, ScalarType out_dtype) -> Tensor")
_LINEAR_OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _linear_check(x_q, x_scale, x_zero_point, w_q, w_scale, w_colsum, bias, out_dtype):
    _check(x_q, x_zero_point, w_q, w_scale)
    rows = x_q.numel() // max(x_q.shape[-1], 1)
    if x_scale.numel() not in (1, rows):
        raise ValueError(f"int8_linear: x_scale must have one entry or one per row ({rows}), got {tuple(x_scale.shape)}")
    if w_colsum is not None and (w_colsum.dtype != torch.int32 or w_colsum.numel() != w_q.shape[0]):
        raise ValueError(f"int8_linear: w_colsum must be int32 [N={w_q.shape[0]}], got {w_colsum.dtype} "
                         f"{tuple(w_colsum.shape)}")
    if bias is not None and bias.numel() != w_q.shape[0]:
        raise ValueError(f"int8_linear: bias must have N={w_q.shape[0]} entries, got {tuple(bias.shape)}")
    if out_dtype not in _LINEAR_OUT_DTYPES:
        raise TypeError(f"int8_linear: out_dtype must be one of {_LINEAR_OUT_DTYPES}, got {out_dtype}")


def _int8_linear_reference(x_q, x_scale, x_zero_point, w_q, w_scale, w_colsum, bias, out_dtype):
    _linear_check(x_q, x_scale, x_zero_point, w_q, w_scale, w_colsum, bias, out_dtype)
    x_scale = x_scale.to(torch.float32)
    x_scale = x_scale.reshape(()) if x_scale.numel() == 1 else x_scale.reshape(*x_q.shape[:-1], 1)
    y = reference.int8_gemm(x_q, x_zero_point, w_q, w_scale.reshape(-1)) * x_scale
    if bias is not None:
        y = y + bias.reshape(-1).to(torch.float32)
    return y.to(out_dtype)


def _int8_linear_cuda(x_q, x_scale, x_zero_point, w_q, w_scale, w_colsum, bias, out_dtype):
    _linear_check(x_q, x_scale, x_zero_point, w_q, w_scale, w_colsum, bias, out_dtype)
    from qcompiler.lowering.kernels import triton_int8

    out = triton_int8.int8_gemm(x_q.reshape(-1, x_q.shape[-1]), x_scale, w_q, w_scale, bias, x_zero_point, w_colsum,
                                out_dtype)
    return out.reshape(*x_q.shape[:-1], w_q.shape[0])


_lib.impl("int8_linear", _int8_linear_reference, "CPU")
_lib.impl("int8_linear", _int8_linear_cuda, "CUDA")
_lib.impl("int8_linear", _int8_linear_reference, "CompositeExplicitAutograd")


@torch.library.register_fake("qcompiler::int8_linear", lib=_lib)
def _(x_q, x_scale, x_zero_point, w_q, w_scale, w_colsum, bias, out_dtype):
    return x_q.new_empty((*x_q.shape[:-1], w_q.shape[0]), dtype=out_dtype)


int8_linear = torch.ops.qcompiler.int8_linear.default

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


def triton_int4_reason(n: int, k: int, group_size: int) -> str | None:
    """None when the Triton int4 kernel takes an ``[n, k]`` weight in groups of ``group_size`` in all its
    configs, else why not."""
    from qcompiler.lowering.kernels import triton_int4

    return triton_int4.unsupported_reason(n, k, group_size)


def kernel_for(device: torch.device, weight_bits: int = 8, why_not_fast: str | None = None) -> str:
    """The kernel a layer runs on ``device``; ``why_not_fast`` names why the fast one does not apply."""
    if weight_bits <= 4:
        if device.type == "cuda" and why_not_fast is None:
            return "Triton int4 GEMM (dequantize in registers, split-K for small M)"
        if device.type == "cpu" and why_not_fast is None:
            return "ATen CPU int4 kernel (_weight_int4pack_mm_for_cpu, bf16 activations)"
        return f"int4 reference: unpack, dequantize, fp32 matmul ({why_not_fast or 'no ' + device.type + ' kernel'})"
    if device.type == "cpu":
        return cpu.describe()
    if device.type == "cuda":
        return "Triton int8 GEMM (int32 tensor-core accumulation; scales, bias and output dtype in its epilogue)"
    return f"reference int8 GEMM on {device.type} (no {device.type} kernel)"

