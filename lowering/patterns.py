"""Replacements for quantized linears, indexed by a small key type.

The passes leave each quantized linear as ``linear(dequantize(quantize(x)), dequantize(w_q), b)``
(weight-only: ``linear(x, dequantize(w_q), b)``) with a :class:`~qcompiler.ir.QLinearSpec` on it.
:func:`key_of` reduces the spec to a :class:`QLinearKey`; :data:`LOWERINGS` maps a key to a
:class:`Lowering`: ``prepare`` puts the weight in the device kernel's format (new buffers and
constants, :class:`Prepared`), ``replace`` is a plain eager function that computes the layer with the
kernel. ``replace`` is traced into the graph with FX proxies, so the quantization math around the
kernel (per-token absmax, rounding, output scaling, bias) stays ordinary aten ops that Inductor fuses
into neighbouring kernels.

A lowering may have a CUDA variant (``Lowering.cuda``), chosen by :meth:`Lowering.for_device`. The
W8A8 ones do: there the activation quantization is the Triton kernel behind
``qcompiler::quantize_per_token`` and the scales, bias and output cast run in the epilogue of the
Triton int8 GEMM (``qcompiler::int8_linear``), rather than as aten ops around a ones-scale GEMM.
The CPU graphs are the ones above, unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from qcompiler import primitives
from qcompiler.ir import QLinearSpec
from qcompiler.lowering import ops
from qcompiler.lowering.kernels import cpu, reference


@dataclass(frozen=True)
class QLinearKey:
    weight_bits: int
    weight_symmetric: bool
    weight_granularity: str  # "per_channel", "per_group", "per_tensor"
    activation: str | None  # "dynamic_per_token", "dynamic_per_tensor", None (weight-only)
    activation_bits: int | None
    activation_symmetric: bool | None

    def describe(self) -> str:
        act = f"A{self.activation_bits} {self.activation}" if self.activation else "A16/32"
        sym = "sym" if self.weight_symmetric else "asym"
        return f"W{self.weight_bits} {self.weight_granularity} {sym}, {act}"


def _weight_granularity(block_size: tuple[int, ...]) -> str:
    if block_size == primitives.per_channel(2, 0):
        return "per_channel"
    if block_size == primitives.per_tensor(2):
        return "per_tensor"
    return "per_group"


def key_of(spec: QLinearSpec) -> QLinearKey:
    return QLinearKey(
        weight_bits=spec.weight_bits,
        weight_symmetric=spec.weight_symmetric,
        weight_granularity=_weight_granularity(tuple(spec.weight_block_size)),
        activation=spec.activation,
        activation_bits=spec.activation_bits,
        activation_symmetric=spec.activation_symmetric,
    )


@dataclass
class Prepared:
    """What ``replace`` is called with for one layer: ``buffers`` (keyword -> buffer name on the
    GraphModule, passed as ``get_attr`` nodes), ``constants`` (keyword -> Python value baked into the
    graph), the kernel's name, and the bytes the kernel's weight format holds (None: as quantized)."""

    buffers: dict[str, str] = field(default_factory=dict)
    constants: dict = field(default_factory=dict)
    kernel: str = ""
    stored_bytes: int | None = None


@dataclass(frozen=True)
class Lowering:
    prepare: Callable[[fx.GraphModule, QLinearSpec, torch.device], "Prepared | str"]  # str: why not
    replace: Callable
    cuda: "Lowering | None" = None  # the variant for CUDA devices, where it differs

    def for_device(self, device: torch.device) -> "Lowering":
        return self.cuda if device.type == "cuda" and self.cuda is not None else self


# --- int8 weights, int8 activations ---------------------------------------------------------------


def _prepare_int8(gm: fx.GraphModule, spec: QLinearSpec, device: torch.device) -> Prepared:
    w_q, w_scale = gm.get_buffer(spec.w_q), gm.get_buffer(spec.w_scale)
    prepared = Prepared(buffers={"w_q": spec.w_q, "w_scale": spec.w_scale},
                        constants={"handle": ops.prepare_weight(w_q, w_scale)}, kernel=ops.kernel_for(device))
    if spec.x_scale is not None:
        # the static zero point is a constant of the kernel call; the scale stays a buffer
        zp = gm.get_buffer(spec.x_zero_point) if spec.x_zero_point else None
        prepared.buffers["x_scale"] = spec.x_scale
        prepared.constants.update(x_zero_point=None if zp is None else int(zp.flatten()[0]),
                                  symmetric=spec.activation_symmetric)
    return prepared


def w8a8_dynamic_per_token(x, bias, *, w_q, w_scale, handle: int, ndim: int, out_dtype: torch.dtype, **_):
    """int8 per-token activations x int8 per-channel weights, int32 accumulation."""
    block = primitives.per_token(ndim)
    qmin, qmax = primitives.quant_range(8, symmetric=True)
    x_scale, _ = primitives.choose_qparams_math(x, block, qmin, qmax, True)
    x_q = primitives.quantize_math(x, x_scale, None, block, qmin, qmax, torch.int8,
                                   compute_dtype=primitives.compute_dtype_for(out_dtype))
    y = torch.ops.qcompiler.int8_gemm(x_q, 0, w_q, w_scale, handle) * x_scale
    if bias is not None:
        y = y + bias
    return y.to(out_dtype)


def w8a8_static_per_tensor(x, bias, *, w_q, w_scale, handle: int, ndim: int, out_dtype: torch.dtype,
                           x_scale, x_zero_point: int | None, symmetric: bool, **_):
    """8-bit activations with a calibrated per-tensor range x int8 per-channel weights.

    ``x_scale`` is the scale buffer; ``x_zero_point`` the zero point as a Python int (static), None
    when symmetric.
    """
    block = primitives.per_tensor(ndim)
    qmin, qmax = primitives.quant_range(8, symmetric)
    zp = None if symmetric else x_zero_point
    x_q = primitives.quantize_math(x, x_scale, zp, block, qmin, qmax, primitives.storage_dtype(qmin, qmax),
                                   compute_dtype=primitives.compute_dtype_for(out_dtype))
    y = torch.ops.qcompiler.int8_gemm(x_q, zp or 0, w_q, w_scale, handle) * x_scale
    if bias is not None:
        y = y + bias
    return y.to(out_dtype)


# --- int8 on CUDA: Triton quantization and GEMM, everything else in the GEMM's epilogue --------------

_KERNEL_OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _prepare_int8_cuda(gm: fx.GraphModule, spec: QLinearSpec, device: torch.device) -> Prepared:
    prepared = Prepared(buffers={"w_q": spec.w_q, "w_scale": spec.w_scale}, kernel=ops.kernel_for(device))
    if spec.x_scale is None:
        prepared.kernel = "Triton per-token quantization, then " + prepared.kernel
        return prepared
    zp = gm.get_buffer(spec.x_zero_point) if spec.x_zero_point else None
    prepared.buffers["x_scale"] = spec.x_scale
    prepared.constants.update(x_zero_point=None if zp is None else int(zp.flatten()[0]),
                              symmetric=spec.activation_symmetric)
    if not spec.activation_symmetric:
        # uint8 activations: the kernel corrects the zero point with the weight's row sums, computed once here
        w_colsum = gm.get_buffer(spec.w_q).sum(1, dtype=torch.int32)
        prepared.buffers["w_colsum"] = _register(gm, spec.w_q.removesuffix("_w_q") + "_w_colsum", w_colsum)
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


# --- 2..4-bit weights, float activations -----------------------------------------------------------


def _int4_storage(gm: fx.GraphModule, spec: QLinearSpec):
    """The layer's integers shifted into [0, 15], its group size, per-group scale and zero ``[N, K // g]``."""
    w_q = gm.get_buffer(spec.w_q)
    n, k = w_q.shape
    group = k if spec.weight_block_size[1] == -1 or spec.weight_block_size[1] >= k else spec.weight_block_size[1]
    scale = gm.get_buffer(spec.w_scale).reshape(n, k // group).to(torch.float32)
    if spec.weight_symmetric:  # q in [-(2^(b-1) - 1), 2^(b-1) - 1]: stored as q + 8
        w_int, zero = w_q.to(torch.int16) + 8, torch.full_like(scale, 8.0)
    else:  # q in [0, 2^b - 1] with an integer zero point
        w_int = w_q.to(torch.int16)
        zero = gm.get_buffer(spec.w_zero_point).reshape(n, k // group).to(torch.float32)
    return w_int, group, scale, zero


def _register(gm: fx.GraphModule, base: str, tensor: torch.Tensor) -> str:
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    gm.register_buffer(name, tensor)
    return name


def _prepare_int4(gm: fx.GraphModule, spec: QLinearSpec, device: torch.device) -> Prepared | str:
    """The device's int4 kernel where it takes the layer's shape and group; otherwise the reference,
    decided here and named in the report with the reason (never an error at run time)."""
    w_q = gm.get_buffer(spec.w_q)
    n, k = w_q.shape
    if k % 2:
        return f"K={k} is odd: two 4-bit weights are packed per byte"
    w_int, group, scale, zero = _int4_storage(gm, spec)
    base = spec.w_q.removesuffix("_w_q")
    why = None
    if device.type == "cpu":
        why = ops.int4_cpu_reason(n, k, group)
        if why is None:
            packed, scale_zeros = cpu.pack_int4_for_cpu(w_int, scale, zero)
            buffers = {"packed": _register(gm, base + "_w4_cpu", packed),
                       "scale_zeros": _register(gm, base + "_w4_scale_zeros", scale_zeros)}
            stored = packed.numel() * packed.element_size() + scale_zeros.numel() * scale_zeros.element_size()
            return Prepared(buffers=buffers, constants={"group_size": group, "layout": "cpu"},
                            kernel=ops.kernel_for(device, 4), stored_bytes=stored)
    elif device.type == "cuda":
        why = ops.triton_int4_reason(n, k, group)
    layout = "triton" if device.type == "cuda" and why is None else "reference"
    packed = reference.pack_int4(w_int)
    buffers = {"w_packed": _register(gm, base + "_w4", packed),
               "scale": _register(gm, base + "_w4_scale", scale),
               "zero": _register(gm, base + "_w4_zero", zero)}
    stored = packed.numel() + scale.numel() * scale.element_size() + zero.numel() * zero.element_size()
    return Prepared(buffers=buffers, constants={"group_size": group, "layout": layout},
                    kernel=ops.kernel_for(device, 4, why), stored_bytes=stored)


def w4a16(x, bias, *, group_size: int, layout: str, out_dtype: torch.dtype, w_packed=None, scale=None,
          zero=None, packed=None, scale_zeros=None, **_):
    """Float activations x 4-bit per-group weights (two per byte), float accumulation. ``layout``:
    ``"cpu"`` (ATen's int4 kernel), ``"triton"`` (the Triton kernel), ``"reference"``."""
    if layout == "cpu":
        y = torch.ops.qcompiler.int4_gemm_cpu(x, packed, scale_zeros, group_size)
    elif layout == "triton":
        y = torch.ops.qcompiler.int4_gemm(x, w_packed, scale, zero, group_size)
    else:
        y = torch.ops.qcompiler.int4_gemm_reference(x, w_packed, scale, zero, group_size)
    if bias is not None:
        y = y + bias
    return y.to(out_dtype)


_INT8 = Lowering(_prepare_int8, w8a8_dynamic_per_token,
                 cuda=Lowering(_prepare_int8_cuda, w8a8_dynamic_per_token_cuda))
_INT8_STATIC = Lowering(_prepare_int8, w8a8_static_per_tensor,
                        cuda=Lowering(_prepare_int8_cuda, w8a8_static_per_tensor_cuda))
_INT4 = Lowering(_prepare_int4, w4a16)

LOWERINGS: dict[QLinearKey, Lowering] = {
    QLinearKey(8, True, "per_channel", "dynamic_per_token", 8, True): _INT8,
    QLinearKey(8, True, "per_channel", "static_per_tensor", 8, False): _INT8_STATIC,
    QLinearKey(8, True, "per_channel", "static_per_tensor", 8, True): _INT8_STATIC,
    **{QLinearKey(bits, sym, gran, None, None, None): _INT4
       for bits in (2, 3, 4) for sym in (True, False) for gran in ("per_group", "per_channel")},
}
