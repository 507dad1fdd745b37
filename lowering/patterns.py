"""Replacements for quantized linears, indexed by a small key type.

The passes leave each quantized linear as ``linear(dequantize(quantize(x)), dequantize(w_q), b)``
(weight-only: ``linear(x, dequantize(w_q), b)``) with a :class:`~qcompiler.core.ir.QLinearSpec` on it.
:func:`~qcompiler.lowering.key.key_of` reduces the spec to a :class:`~qcompiler.lowering.key.QLinearKey`;
:data:`LOWERINGS` maps a key to a :class:`~qcompiler.lowering.key.Lowering`: ``prepare`` puts the
weight in the device kernel's format (new buffers and constants), ``replace`` is a plain eager
function that computes the layer with the kernel, ``choose`` says which kernel ``prepare`` will take
(the plan records it). ``replace`` is traced into the graph with FX proxies, so the quantization math
around the kernel (per-token absmax, rounding, output scaling, bias) stays ordinary aten ops that
Inductor fuses into neighbouring kernels. The variants live in ``int8.py`` and ``int4.py``.
"""

from __future__ import annotations

from qcompiler.lowering.int4 import INT4
from qcompiler.lowering.int8 import INT8, INT8_STATIC, W8A16
from qcompiler.lowering.key import Lowering, QLinearKey

LOWERINGS: dict[QLinearKey, Lowering] = {
    QLinearKey(8, True, "per_channel", "dynamic_per_token", 8, True): INT8,
    # W4A8: 4-bit symmetric weights held as int8 on the same kernels (their pair sums never saturate int16)
    QLinearKey(4, True, "per_channel", "dynamic_per_token", 8, True): INT8,
    QLinearKey(8, True, "per_channel", "static_per_tensor", 8, False): INT8_STATIC,
    QLinearKey(8, True, "per_channel", "static_per_tensor", 8, True): INT8_STATIC,
    QLinearKey(8, True, "per_channel", None, None, None): W8A16,
    **{QLinearKey(bits, sym, gran, None, None, None): INT4
       for bits in (2, 3, 4) for sym in (True, False) for gran in ("per_group", "per_channel")},
}
