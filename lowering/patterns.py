"""Replacements for quantized linears, indexed by a small key type.

The passes leave each quantized linear as ``linear(dequantize(quantize(x)), dequantize(w_q), b)``
with a :class:`~qcompiler.ir.QLinearSpec` on it. :func:`key_of` reduces the spec to a
:class:`QLinearKey`; :data:`REPLACEMENTS` maps a key to a plain eager function that computes the same
thing with an integer kernel. The functions are traced into the graph with FX proxies, so the
quantization math around the kernel (per-token absmax, rounding, output scaling, bias) stays ordinary
aten ops that Inductor fuses into neighbouring kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from qcompiler import primitives
from qcompiler.ir import QLinearSpec


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


def w8a8_dynamic_per_token(x, w_q, w_scale, bias, *, handle: int, ndim: int, out_dtype: torch.dtype, **_):
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


def w8a8_static_per_tensor(x, w_q, w_scale, bias, *, handle: int, ndim: int, out_dtype: torch.dtype,
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


REPLACEMENTS: dict[QLinearKey, Callable] = {
    QLinearKey(8, True, "per_channel", "dynamic_per_token", 8, True): w8a8_dynamic_per_token,
    QLinearKey(8, True, "per_channel", "static_per_tensor", 8, False): w8a8_static_per_tensor,
    QLinearKey(8, True, "per_channel", "static_per_tensor", 8, True): w8a8_static_per_tensor,
}
