"""``qcompiler::`` kernel ops: custom ops with fake implementations and per-device dispatch.

``qcompiler::int8_gemm(x_q, x_zero_point, w_q, w_scale, handle)`` computes
``((x_q - x_zero_point) @ w_q.T) * w_scale``: int8 (zero point 0) or uint8 activations ``[..., K]``
times int8 weights ``[N, K]`` with int32 accumulation, one float scale per output channel, float32 out. ``handle`` names the weight's prepacked form (see
``kernels/cpu.register_weight``); the kernel is still correct when it names nothing.

Dispatch: CPU with FBGEMM -> ``kernels/cpu.py``; any other device -> ``kernels/reference.py``
(the Triton GPU kernels are a separate work item). :func:`kernel_for` says which, so the backend's
report names it.
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


_lib.impl("int8_gemm", _cpu_kernel, "CPU")
_lib.impl("int8_gemm", _reference_kernel, "CUDA")


@torch.library.register_fake("qcompiler::int8_gemm", lib=_lib)
def _(x_q, x_zero_point, w_q, w_scale, handle):
    return x_q.new_empty((*x_q.shape[:-1], w_q.shape[0]), dtype=torch.float32)


int8_gemm = torch.ops.qcompiler.int8_gemm.default


def prepare_weight(w_q: torch.Tensor, w_scale: torch.Tensor) -> int:
    """Pack a weight for the kernel of its device; returns the handle for ``int8_gemm``."""
    if w_q.device.type == "cpu" and cpu.available():
        return cpu.register_weight(w_q, w_scale)
    return 0


def kernel_for(device: torch.device) -> str:
    if device.type == "cpu":
        return cpu.describe()
    return f"reference int8 GEMM on {device.type} (no {device.type} kernel yet)"


def int8_pair_limit(device: torch.device) -> int | None:
    """The weight-pair limit the int8 kernel of ``device`` needs, if its int16 sums saturate."""
    if device.type == "cpu" and cpu.available() and cpu.saturates():
        return cpu.PAIR_LIMIT
    return None
