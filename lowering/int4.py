"""Lowerings of 2..4-bit weights with float activations (W4A16).

CPU: for graphs with a fixed small row count (the decode step) the C++ ``qcompiler::int4_gemv`` of
``kernels/cpu_gemv.cpp`` (activations in int16 fixed point, integer sums per group: more exact than bf16,
and stacked for q/k/v and gate/up by ``fuse_gemv``; on AVX-512 ``int4_gemv_tiled``, the same arithmetic on
weights in tiles of 32 rows where N is a multiple of 32); otherwise ATen's int4 kernel
(``_weight_int4pack_mm_for_cpu``, the one torchao's int4 CPU layout uses) on weights packed once in its
tile layout, called straight from the graph (an aten op: no Python runs per layer); it computes in bf16
(its fp32 path is not vectorized). CUDA: the Triton int4 GEMM. A layer the
device's kernel does not take runs ``qcompiler::int4_gemm_reference``, decided at prepare time and
named in the report.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from qcompiler.core.ir import QLinearSpec
from qcompiler.lowering import ops
from qcompiler.lowering.kernels import cpu, native, reference
from qcompiler.lowering.key import REFERENCE_OPS, Layer, Lowering, Prepared, register


def _int4_storage(gm: fx.GraphModule, spec: QLinearSpec):
    """The layer's integers shifted into [0, 15], its group size, per-group scale and zero ``[N, K // g]``."""
    w_q = gm.get_buffer(spec.w_q)
    n, k = w_q.shape
    group = spec.group_size if spec.weight_granularity == "per_group" and spec.group_size < k else k
    scale = gm.get_buffer(spec.w_scale).reshape(n, k // group).to(torch.float32)
    if spec.weight_symmetric:  # q in [-(2^(b-1) - 1), 2^(b-1) - 1]: stored as q + 8
        w_int, zero = w_q.to(torch.int16) + 8, torch.full_like(scale, 8.0)
    else:  # q in [0, 2^b - 1] with an integer zero point
        w_int = w_q.to(torch.int16)
        zero = gm.get_buffer(spec.w_zero_point).reshape(n, k // group).to(torch.float32)
    return w_int, group, scale, zero


def _int4_reason(layer: Layer) -> str | None:
    """Why the device's fast int4 kernel does not take the layer (None when it does)."""
    if layer.device.type == "cpu":
        return ops.int4_cpu_reason(layer.n, layer.k, layer.group)
    if layer.device.type == "cuda":
        return ops.triton_int4_reason(layer.n, layer.k, layer.group)
    return f"no {layer.device.type} kernel"


INT4_GEMV_KERNEL = ("C++ int4 GEMV (lowering/kernels/cpu_gemv.cpp: int16 fixed-point activations x 4-bit weights, "
                    "integer group sums, fixed row count)")


def _choose_int4(layer: Layer) -> tuple[str, str]:
    if layer.k % 2:
        return REFERENCE_OPS, f"K={layer.k} is odd: two 4-bit weights are packed per byte"
    if layer.gemv and layer.group % 2 == 0 and layer.k % layer.group == 0:
        why = native.unavailable_reason()
        if why is None:
            return INT4_GEMV_KERNEL, ""
    why = _int4_reason(layer)
    return ops.kernel_for(layer.device, 4, why), why or ""


def _tiled(layer: Layer) -> bool:
    """Whether the decode GEMV of ``layer`` takes the tiled layout (``qcompiler::int4_gemv_tiled``: 32 rows in
    two AVX-512 registers or four AVX2 ones; on builds with either, where it is faster than the row layout's
    kernel; a "generic" build keeps the rows)."""
    return (layer.n % reference.INT4_TILE == 0 and layer.k % 4 == 0 and layer.group % 4 == 0
            and native.isa() not in (None, "generic"))


def _prepare_int4(gm: fx.GraphModule, spec: QLinearSpec, layer: Layer) -> Prepared | str:
    """The device's int4 kernel where it takes the layer's shape and group; otherwise the reference,
    decided here (by the same rule the plan reads through ``choose``) and named in the report with the
    reason (never an error at run time)."""
    if layer.k % 2:
        return _choose_int4(layer)[1]
    w_int, group, scale, zero = _int4_storage(gm, spec)
    base = spec.w_q.removesuffix("_w_q")
    kernel, why = _choose_int4(layer)
    if kernel == INT4_GEMV_KERNEL and _tiled(layer):
        tiled, scale_t, zero_t = reference.pack_int4_tiled(w_int, scale, zero)
        buffers = {"w_tiled": register(gm, base + "_w4t", tiled), "scale": register(gm, base + "_w4t_scale", scale_t),
                   "zero": register(gm, base + "_w4t_zero", zero_t)}
        stored = tiled.numel() + scale.numel() * scale.element_size() + zero.numel() * zero.element_size()
        return Prepared(buffers=buffers, constants={"group_size": group, "layout": "gemv_tiled"}, kernel=kernel,
                        stored_bytes=stored)
    if kernel == INT4_GEMV_KERNEL:
        packed = reference.pack_int4(w_int)
        buffers = {"w_packed": register(gm, base + "_w4", packed),
                   "scale": register(gm, base + "_w4_scale", scale.contiguous()),
                   "zero": register(gm, base + "_w4_zero", zero.contiguous())}
        stored = packed.numel() + scale.numel() * scale.element_size() + zero.numel() * zero.element_size()
        return Prepared(buffers=buffers, constants={"group_size": group, "layout": "gemv"}, kernel=kernel,
                        stored_bytes=stored)
    if layer.device.type == "cpu" and not why:
        packed, scale_zeros = cpu.pack_int4_for_cpu(w_int, scale, zero)
        buffers = {"packed": register(gm, base + "_w4_cpu", packed),
                   "scale_zeros": register(gm, base + "_w4_scale_zeros", scale_zeros)}
        stored = packed.numel() * packed.element_size() + scale_zeros.numel() * scale_zeros.element_size()
        return Prepared(buffers=buffers, constants={"group_size": group, "layout": "cpu", "n": layer.n, "k": layer.k},
                        kernel=kernel, stored_bytes=stored)
    layout = "triton" if layer.device.type == "cuda" and not why else "reference"
    packed = reference.pack_int4(w_int)
    buffers = {"w_packed": register(gm, base + "_w4", packed),
               "scale": register(gm, base + "_w4_scale", scale),
               "zero": register(gm, base + "_w4_zero", zero)}
    stored = packed.numel() + scale.numel() * scale.element_size() + zero.numel() * zero.element_size()
    return Prepared(buffers=buffers, constants={"group_size": group, "layout": layout}, kernel=kernel,
                    stored_bytes=stored)


def _int4_cpu(x, packed, scale_zeros, group_size: int, ndim: int, n: int, k: int):
    """ATen's CPU int4 kernel on ``x [..., K]``, traced into the graph (the aten op is called from the
    compiled code directly; the casts and reshapes around it are fused by Inductor)."""
    x2d = x.reshape(-1, k).to(cpu.INT4_COMPUTE_DTYPE)
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(x2d, packed, group_size, scale_zeros)
    return out.to(x.dtype).reshape([x.size(i) for i in range(ndim - 1)] + [n])


def w4a16(x, bias, *, group_size: int, layout: str, out_dtype: torch.dtype, ndim: int, w_packed=None, scale=None,
          zero=None, packed=None, scale_zeros=None, n: int = 0, k: int = 0, w_tiled=None, **_):
    """Float activations x 4-bit per-group weights (two per byte), float accumulation. ``layout``:
    ``"cpu"`` (ATen's int4 kernel), ``"triton"`` (the Triton kernel), ``"reference"``."""
    if layout == "cpu":
        y = _int4_cpu(x, packed, scale_zeros, group_size, ndim, n, k)
    elif layout == "gemv_tiled":
        y = torch.ops.qcompiler.int4_gemv_tiled(x.to(torch.float32), w_tiled, scale, zero, group_size)
    elif layout == "gemv":
        y = torch.ops.qcompiler.int4_gemv(x.to(torch.float32), w_packed, scale, zero, group_size)
    elif layout == "triton":
        y = torch.ops.qcompiler.int4_gemm(x, w_packed, scale, zero, group_size)
    else:
        y = torch.ops.qcompiler.int4_gemm_reference(x, w_packed, scale, zero, group_size)
    if bias is not None:
        y = y + bias
    return y.to(out_dtype)


INT4 = Lowering(_prepare_int4, w4a16, _choose_int4)
