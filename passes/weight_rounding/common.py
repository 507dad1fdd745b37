"""Helpers the rounding methods share: group views, min-max parameters per group, the output error."""

from __future__ import annotations

import torch

from qcompiler.config import WeightScheme
from qcompiler.core import primitives, storage
from qcompiler.core.storage import FP16_MAX, FP16_TINY


def group_size_of(scheme: WeightScheme, in_features: int) -> int:
    """Columns per quantization group: ``group_size`` for per-group, all of them per channel."""
    if scheme.granularity == "per_group":
        if in_features % scheme.group_size:
            raise ValueError(f"in_features {in_features} is not a multiple of group_size {scheme.group_size}")
        return scheme.group_size
    if scheme.granularity == "per_channel":
        return in_features
    raise ValueError(f"weight rounding methods take per-channel or per-group schemes, not {scheme.granularity!r}")


def grouped(w: torch.Tensor, group: int) -> torch.Tensor:
    """``[N, K]`` -> ``[N, K // group, group]`` (a view)."""
    n, k = w.shape
    return w.reshape(n, k // group, group)


def weight_qparams(lo: torch.Tensor, hi: torch.Tensor, qmin: int, qmax: int, symmetric: bool):
    """Scale and zero point mapping a weight block's range ``[lo, hi]`` onto ``[qmin, qmax]``.

    Symmetric: as for activations (zero point 0). Asymmetric weights take a *float* zero point
    ``qmin - lo / scale``: ``lo`` and ``hi`` land exactly on ``qmin`` and ``qmax``, the range is not
    widened to include 0 and the zero point is not rounded (the convention of HQQ and of the int4
    kernels, which take float zeros). A constant block gets a scale from its magnitude.
    """
    lo, hi = lo.to(torch.float32), hi.to(torch.float32)
    if symmetric:
        return primitives.qparams_from_range(lo, hi, qmin, qmax, True)
    width = hi - lo
    fallback = torch.maximum(lo.abs(), hi.abs()).clamp_min(1.0) / (qmax - qmin)
    scale = torch.where(width > 0, width / (qmax - qmin), fallback).clamp_min(primitives.MIN_SCALE)
    return scale, qmin - lo / scale


def full_range_scale(lo: torch.Tensor, hi: torch.Tensor, qmin: int) -> torch.Tensor:
    """The scale of ``WeightScheme(full_range=True)``, llama.cpp's Q4_0 grid: the value of largest magnitude
    lands exactly on ``qmin = -2^(b-1)`` and the other side is clamped at ``qmax = 2^(b-1) - 1``, so the step
    is ``absmax / 2^(b-1)``. The scale is negative where that value is positive (``q * scale`` still gives
    it back); its magnitude is at least ``MIN_SCALE``."""
    lo, hi = lo.to(torch.float32), hi.to(torch.float32)
    scale = torch.where(lo.abs() >= hi.abs(), lo, hi) / qmin
    return torch.where(scale.abs() < primitives.MIN_SCALE, torch.full_like(scale, primitives.MIN_SCALE), scale)




def fp16_qparams(scale: torch.Tensor, zero: torch.Tensor | None, symmetric: bool):
    """``scale`` rounded to the nearest fp16 value and, asymmetric, ``zero`` replaced by the float zero
    point whose offset ``-zero * scale`` is the fp16 number ``m`` nearest to the old offset, to float32's
    rounding: GGUF stores ``d = scale`` and ``m`` as fp16, so weights chosen on these parameters are
    written with the values qcompiler computes with.

    ``-zero * scale`` equals ``m`` exactly where a float32 zero point reaches it and is otherwise within
    one float32 step of it (the products of an fp16 scale with neighbouring float32 zero points can step
    over ``m``); :func:`offset_is_fp16` is that test.
    """
    scale = scale.to(torch.float32)
    s = (scale.sign() * scale.abs().clamp(FP16_TINY, FP16_MAX)).to(torch.float16).to(torch.float32)
    if symmetric or zero is None:
        return s, zero
    m = (-zero.to(torch.float32) * s).clamp(-FP16_MAX, FP16_MAX).to(torch.float16)
    return s, storage.zero_from_offset(s, m)


def offset_is_fp16(zero: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per block: is ``-zero * scale`` (float32) an fp16 number to within one float32 step (what
    :func:`fp16_qparams` guarantees)?"""
    offset = -zero.to(torch.float32) * scale.to(torch.float32)
    half = offset.to(torch.float16).to(torch.float32)
    step = (torch.nextafter(offset.abs(), torch.full_like(offset, float("inf"))) - offset.abs())
    return (half - offset).abs() <= step


def minmax_qparams(w_groups: torch.Tensor, scheme: WeightScheme, ratio: torch.Tensor | float = 1.0,
                   float_zero: bool = True):
    """Scale and zero point per group of ``w_groups [..., g]`` from its min/max, shrunk by ``ratio``.

    ``float_zero=False``: the range widened to include 0 and an integer zero point (GPTQ, whose
    error feedback moves later columns of a group after its grid is fixed: the slack keeps them on it).
    ``scheme.fp16_scales``: the parameters put on fp16's grid (:func:`fp16_qparams`; the zero point is
    then a float).
    """
    return scheme_qparams(w_groups.amin(-1) * ratio, w_groups.amax(-1) * ratio, scheme, float_zero)


def scheme_qparams(lo: torch.Tensor, hi: torch.Tensor, scheme: WeightScheme, float_zero: bool = True):
    """Scale and zero point of the weight blocks whose range is ``[lo, hi]`` under ``scheme``: its grid
    (``full_range``: llama.cpp's Q4_0 levels), integer or float zero points (``float_zero``, see
    :func:`minmax_qparams`), then fp16 (``fp16_scales``)."""
    qmin, qmax = scheme.qrange
    if scheme.full_range:
        scale, zero = full_range_scale(lo, hi, qmin), torch.zeros_like(lo, dtype=torch.float32)
    elif not float_zero:
        scale, zero = primitives.qparams_from_range(lo, hi, qmin, qmax, scheme.symmetric)
        zero = zero.to(torch.float32)
    else:
        scale, zero = weight_qparams(lo, hi, qmin, qmax, scheme.symmetric)
    if scheme.fp16_scales:
        return fp16_qparams(scale, zero, scheme.symmetric)
    return scale, zero


def quantize_groups(w_groups: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: WeightScheme):
    """Integers ``round(w / scale + zero)``, clamped, per group of ``w_groups [..., g]`` (scales ``[...]``),
    as float values (the primitives' float-zero-point quantization)."""
    qmin, qmax = scheme.qrange
    zero = None if zero is None or scheme.symmetric else zero[..., None].to(torch.float32)
    return primitives.quantize_math(w_groups, scale[..., None], zero, primitives.per_token(w_groups.dim()), qmin, qmax,
                                    w_groups.dtype)


def dequantize_groups(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: WeightScheme):
    zero = None if zero is None or scheme.symmetric else zero[..., None].to(torch.float32)
    return primitives.dequantize_math(q, scale[..., None], zero, primitives.per_token(q.dim()), q.dtype)


def fake_quant(w: torch.Tensor, scheme: WeightScheme, group: int, ratio=1.0) -> torch.Tensor:
    """Min-max round-trip of ``w [N, K]`` per group (RTN), optionally with clipped ranges."""
    g = grouped(w, group)
    scale, zero = minmax_qparams(g, scheme, ratio)
    return dequantize_groups(quantize_groups(g, scale, zero, scheme), scale, zero, scheme).reshape(w.shape)


def output_error(delta: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """``sum_n delta_n^T H delta_n``: the squared output error over the samples that built ``H = X^T X``."""
    return ((delta @ hessian) * delta).sum()
