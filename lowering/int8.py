"""Lowerings of 8-bit weights: W8A8 (dynamic per-token or static per-tensor activations) and W8A16.

CPU: ``qcompiler::int8_gemm`` (FBGEMM for a few rows, oneDNN above, weights prepacked once) for
graphs whose row count is symbolic or large (prefill), and the C++ GEMV ops of
``kernels/cpu_gemv.cpp`` for graphs with a fixed small row count (the decode step: no Python runs
per layer). The activation's quantization (per-token absmax, rounding, the uint8 shift) stays aten
ops that Inductor fuses into the op that produces ``x``; the GEMV takes uint8 activations (an int8
value ``v`` is ``v + 128`` with zero point 128, exact) so that the CPU's u8 x s8 dot products apply.

CUDA: the activation quantization is the Triton kernel behind ``qcompiler::quantize_per_token`` and
the scales, bias and output cast run in the epilogue of the Triton int8 GEMM (``qcompiler::int8_linear``).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from qcompiler.core import primitives
from qcompiler.core.ir import QLinearSpec
from qcompiler.lowering import ops
from qcompiler.lowering.kernels import native
from qcompiler.lowering.key import REFERENCE_OPS, Layer, Lowering, Prepared, register

GEMV_KERNEL = "C++ GEMV (lowering/kernels/cpu_gemv.cpp: int8 dot products, fixed row count)"


def _gemv_reason(layer: Layer) -> str | None:
    """Why a decode-shaped layer cannot take the C++ GEMV (None when it can, or is not decode-shaped)."""
    return native.unavailable_reason() if layer.gemv else None


def _choose_int8(layer: Layer) -> tuple[str, str]:
    if layer.gemv:
        why = _gemv_reason(layer)
        if why is None:
            return GEMV_KERNEL, ""
        return ops.kernel_for(layer.device), why
    return ops.kernel_for(layer.device), ""


def _static_constants(gm: fx.GraphModule, spec: QLinearSpec, prepared: Prepared) -> None:
    # the static zero point is a constant of the kernel call; the scale stays a buffer
    zp = gm.get_buffer(spec.x_zero_point) if spec.x_zero_point else None
    prepared.buffers["x_scale"] = spec.x_scale
    prepared.constants.update(x_zero_point=None if zp is None else int(zp.flatten()[0]),
                              symmetric=spec.activation_symmetric)


def _prepare_int8(gm: fx.GraphModule, spec: QLinearSpec, layer: Layer) -> Prepared:
    w_q, w_scale = gm.get_buffer(spec.w_q), gm.get_buffer(spec.w_scale)
    kernel, why = _choose_int8(layer)
    prepared = Prepared(buffers={"w_q": spec.w_q, "w_scale": spec.w_scale}, kernel=kernel)
    if kernel == GEMV_KERNEL:
        base = spec.w_q.removesuffix("_w_q")
        prepared.buffers["w_rowsum"] = register(gm, base + "_w_rowsum", w_q.sum(1, dtype=torch.int32))
        prepared.buffers["w_scale"] = register(gm, base + "_w_scale_f32", w_scale.reshape(-1).to(torch.float32))
        prepared.constants["gemv"] = True
    else:
        prepared.constants.update(handle=ops.prepare_weight(w_q, w_scale), gemv=False)
    if spec.x_scale is not None:
        _static_constants(gm, spec, prepared)
    if spec.weight_bits < 8:  # W4A8: the kernels hold the 4-bit integers a byte each
        prepared.stored_bytes = sum(gm.get_buffer(b).nbytes for b in prepared.buffers.values())
    return prepared


def _int8_matmul(x_q, zero_point: int, w_q, w_scale, handle: int, w_rowsum, gemv: bool):
    """``((x_q - zero_point) @ w_q.T) * w_scale`` in float32; the GEMV takes uint8 activations."""
    if gemv:
        return torch.ops.qcompiler.int8_gemv(x_q, zero_point, w_q, w_rowsum, w_scale)
    return torch.ops.qcompiler.int8_gemm(x_q, zero_point, w_q, w_scale, handle)


def _quantize_activation(x, x_scale, zero_point: int | None, block, symmetric: bool, gemv: bool, compute):
    """``(x_q, zero_point)``: int8 (symmetric) or uint8 with its zero point; for the GEMV always uint8,
    a symmetric value ``v`` stored as ``v + 128`` (``round(x / s) + 128`` in [1, 255], in the same kernel)."""
    qmin, qmax = primitives.quant_range(8, symmetric)
    if symmetric and gemv:
        return primitives.quantize_math(x, x_scale, 128, block, qmin + 128, qmax + 128, torch.uint8, compute), 128
    zp = None if symmetric else zero_point
    q = primitives.quantize_math(x, x_scale, zp, block, qmin, qmax, primitives.storage_dtype(qmin, qmax), compute)
    return q, zp or 0


def w8a8_dynamic_per_token(x, bias, *, w_q, w_scale, ndim: int, out_dtype: torch.dtype, gemv: bool,
                           handle: int = 0, w_rowsum=None, **_):
    """int8 per-token activations x int8 per-channel weights, int32 accumulation."""
    block = primitives.per_token(ndim)
    qmin, qmax = primitives.quant_range(8, symmetric=True)
    x_scale, _ = primitives.choose_qparams_math(x, block, qmin, qmax, True)
    compute = primitives.compute_dtype_for(out_dtype)
    x_q, zp = _quantize_activation(x, x_scale, None, block, True, gemv, compute)
    y = _int8_matmul(x_q, zp, w_q, w_scale, handle, w_rowsum, gemv) * x_scale
    if bias is not None:
        y = y + bias
    return y.to(out_dtype)


def w8a8_static_per_tensor(x, bias, *, w_q, w_scale, ndim: int, out_dtype: torch.dtype, x_scale,
                           x_zero_point: int | None, symmetric: bool, gemv: bool, handle: int = 0,
                           w_rowsum=None, **_):
    """8-bit activations with a calibrated per-tensor range x int8 per-channel weights.

    ``x_scale`` is the scale buffer; ``x_zero_point`` the zero point as a Python int (static), None
    when symmetric.
    """
    block = primitives.per_tensor(ndim)
    compute = primitives.compute_dtype_for(out_dtype)
    x_q, zp = _quantize_activation(x, x_scale, x_zero_point, block, symmetric, gemv, compute)
    y = _int8_matmul(x_q, zp, w_q, w_scale, handle, w_rowsum, gemv) * x_scale
    if bias is not None:
        y = y + bias
    return y.to(out_dtype)


# --- int8 on CUDA: Triton quantization and GEMM, everything else in the GEMM's epilogue --------------

_KERNEL_OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _choose_int8_cuda(layer: Layer) -> tuple[str, str]:
    return ops.kernel_for(layer.device), ""


def _choose_int8_cuda_dynamic(layer: Layer) -> tuple[str, str]:
    return "Triton per-token quantization, then " + ops.kernel_for(layer.device), ""


def _prepare_int8_cuda(gm: fx.GraphModule, spec: QLinearSpec, layer: Layer) -> Prepared:
    prepared = Prepared(buffers={"w_q": spec.w_q, "w_scale": spec.w_scale}, kernel=ops.kernel_for(layer.device))
    if spec.x_scale is None:
        prepared.kernel = _choose_int8_cuda_dynamic(layer)[0]
        return prepared
    _static_constants(gm, spec, prepared)
    if not spec.activation_symmetric:
        # uint8 activations: the kernel corrects the zero point with the weight's row sums, computed once here
        w_colsum = gm.get_buffer(spec.w_q).sum(1, dtype=torch.int32)
        prepared.buffers["w_colsum"] = register(gm, spec.w_q.removesuffix("_w_q") + "_w_colsum", w_colsum)
    return prepared


def _int8_linear(x_q, x_scale, zero_point: int, bias, w_q, w_scale, w_colsum, out_dtype: torch.dtype):
    # The kernel writes fp16/bf16/fp32; other float types (float64) get fp32 and a cast.
    kernel_dtype = out_dtype if out_dtype in _KERNEL_OUT_DTYPES else torch.float32
    y = torch.ops.qcompiler.int8_linear(x_q, x_scale, zero_point, w_q, w_scale, w_colsum, bias, kernel_dtype)
    return y if kernel_dtype == out_dtype else y.to(out_dtype)


def w8a8_dynamic_per_token_cuda(x, bias, *, w_q, w_scale, out_dtype: torch.dtype, **_):
    """:func:`w8a8_dynamic_per_token` as two Triton kernels: per-token quantization, int8 GEMM + epilogue."""
    x_q, x_scale = torch.ops.qcompiler.quantize_per_token(x, None)
    return _int8_linear(x_q, x_scale, 0, bias, w_q, w_scale, None, out_dtype)


def w8a8_static_per_tensor_cuda(x, bias, *, w_q, w_scale, ndim: int, out_dtype: torch.dtype, x_scale,
                                x_zero_point: int | None, symmetric: bool, w_colsum=None, **_):
    """:func:`w8a8_static_per_tensor` with the scales, bias and cast in the Triton GEMM's epilogue; the
    quantization (a scale and a zero point known at compile time) stays aten ops that Inductor fuses
    into the producer of ``x``."""
    block = primitives.per_tensor(ndim)
    qmin, qmax = primitives.quant_range(8, symmetric)
    zp = None if symmetric else x_zero_point
    x_q = primitives.quantize_math(x, x_scale, zp, block, qmin, qmax, primitives.storage_dtype(qmin, qmax),
                                   compute_dtype=primitives.compute_dtype_for(out_dtype))
    return _int8_linear(x_q, x_scale, zp or 0, bias, w_q, w_scale, w_colsum, out_dtype)


# --- int8 weights, float activations (W8A16) -------------------------------------------------------

W8A16_GEMM = "dequantize, then a float GEMM (Inductor)"


def _choose_w8a16(layer: Layer) -> tuple[str, str]:
    if layer.device.type != "cpu":
        return REFERENCE_OPS, f"no {layer.device.type} kernel for int8 weight-only layers"
    why = _gemv_reason(layer)
    if layer.gemv and why is None:
        return GEMV_KERNEL, ""
    return W8A16_GEMM, why or ("the C++ GEMV takes fixed row counts of at most 8; this graph's are symbolic or more")


def _prepare_w8a16(gm: fx.GraphModule, spec: QLinearSpec, layer: Layer) -> Prepared | str:
    kernel, why = _choose_w8a16(layer)
    if kernel == REFERENCE_OPS:
        return why
    w_scale = gm.get_buffer(spec.w_scale)
    flat = register(gm, spec.w_q.removesuffix("_w_q") + "_w_scale_f32", w_scale.reshape(-1).to(torch.float32))
    return Prepared(buffers={"w_q": spec.w_q, "w_scale": flat}, constants={"gemv": kernel == GEMV_KERNEL},
                    kernel=kernel)


def w8a16(x, bias, *, w_q, w_scale, out_dtype: torch.dtype, gemv: bool, **_):
    """Float activations x int8 per-channel weights: the C++ GEMV on fixed small row counts, else the
    weight dequantized by an Inductor kernel and a float GEMM."""
    if gemv:
        y = torch.ops.qcompiler.int8_weight_gemv(x.to(torch.float32), w_q, w_scale)
        if bias is not None:
            y = y + bias
        return y.to(out_dtype)
    w = (w_q.to(torch.float32) * w_scale[:, None]).to(x.dtype)
    return torch.nn.functional.linear(x, w, bias).to(out_dtype)


INT8 = Lowering(_prepare_int8, w8a8_dynamic_per_token, _choose_int8,
                cuda=Lowering(_prepare_int8_cuda, w8a8_dynamic_per_token_cuda, _choose_int8_cuda_dynamic))
INT8_STATIC = Lowering(_prepare_int8, w8a8_static_per_tensor, _choose_int8,
                       cuda=Lowering(_prepare_int8_cuda, w8a8_static_per_tensor_cuda, _choose_int8_cuda))
W8A16 = Lowering(_prepare_w8a16, w8a16, _choose_w8a16)
