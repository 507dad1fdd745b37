"""Static W8A8 on CPU: which integer kernel is fastest while exact to the recipe?

Static recipe: uint8 activations with one calibrated (scale, zero point) per tensor, int8 per-channel
weights, float output. Options timed against fp32 F.linear on SmolLM2-135M's layer shapes, in one
process, medians of interleaved repeats (``qcompiler.tools.timing.time_interleaved``):

  qcompiler   qcompiler::int8_gemm (what the lowering emits) on the activation quantized by our own
              rounding, then FBGEMM (<= 8 rows) or oneDNN (more rows, VNNI/AMX CPUs). The rounding
              and the output scaling are left out of the timing: in a compiled model Inductor fuses
              them into the neighbouring ops.
  fbgemm_qdq  FBGEMM's fused op quantizing the float input itself with the static scale/zero point
  onednn      oneDNN qlinear (the x86 Inductor int8 path) on the same uint8 input
  fbgemm_q    FBGEMM static quantized::linear with quint8 in and out (the output is requantized to
              8 bits, so it is not exact to a recipe with float output; timed for reference)

"exact" compares with the integer reference ((x_q - zp) @ w_q.T) * w_scale * x_scale.

    python examples/bench_static_kernels.py
"""

import warnings

import torch
import torch.nn.functional as F

from qcompiler.core import primitives
from qcompiler.lowering import ops  # noqa: F401  (registers qcompiler::int8_gemm)
from qcompiler.lowering.kernels import cpu, reference
from qcompiler.tools.timing import time_interleaved

warnings.filterwarnings("ignore")


def main():
    torch.manual_seed(0)
    print(f"{'M':>4} {'K':>5} {'N':>5}  {'fp32 us':>8}  " + "  ".join(f"{n:>18}" for n in ("qcompiler", "fbgemm_qdq", "onednn", "fbgemm_q")))
    for m in (1, 16, 128, 512):
        for k, n in ((576, 576), (576, 1536), (1536, 576)):
            x = torch.randn(m, k)
            w = torch.randn(n, k) * 0.05
            w_scale, _ = primitives.choose_qparams_math(w, primitives.per_channel(2), -127, 127, True)
            w_q = primitives.quantize_math(w, w_scale, None, primitives.per_channel(2), -127, 127, torch.int8)
            w_scale = w_scale.reshape(n)
            scale, zp = primitives.qparams_from_range(x.min(), x.max(), 0, 255, False)
            s, z = float(scale), int(zp)
            x_q = primitives.quantize_math(x, scale, zp, primitives.per_tensor(2), 0, 255, torch.uint8)
            expected = reference.int8_gemm(x_q, z, w_q, w_scale) * s
            handle = cpu.register_weight(w_q, w_scale)
            packed = cpu._packed[handle]
            w_fp = w_q.float() * w_scale[:, None]

            def ours():
                return torch.ops.qcompiler.int8_gemm(x_q, z, w_q, w_scale, handle) * s

            def fbgemm_qdq():
                return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(x, s, z, packed.fbgemm)

            def onednn():
                return torch.ops.onednn.qlinear_pointwise(x_q, s, z, packed.onednn, packed.w_scale, packed.zero_points,
                                                          None, 1.0, 0, torch.float32, "none", [], "")

            qx = torch._make_per_tensor_quantized_tensor(x_q, s, z)
            out_scale = float((expected.abs().max() / 127).clamp_min(1e-8))

            def fbgemm_q():
                return torch.ops.quantized.linear(qx, packed.fbgemm, out_scale, 128)

            kernels = {"qcompiler": ours, "fbgemm_qdq": fbgemm_qdq, "onednn": onednn, "fbgemm_q": fbgemm_q}
            if packed.onednn is None:
                del kernels["onednn"]
            exact = {}
            for name, fn in kernels.items():
                out = fn()
                out = out.dequantize() if out.is_quantized else out
                exact[name] = torch.allclose(out, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
            # medians of 30 rounds, the float baseline and the kernels called in turn (drift hits all alike)
            us = {name: t * 1e6 for name, t in
                  time_interleaved({"fp32": lambda: F.linear(x, w_fp), **kernels}, repeats=30, warmup=3).items()}
            t_fp = us["fp32"]
            cells = []
            for name in ("qcompiler", "fbgemm_qdq", "onednn", "fbgemm_q"):
                if name not in kernels:
                    cells.append(f"{'n/a':>18}")
                    continue
                t = us[name]
                cells.append(f"{t_fp / t:>6.2f}x {'exact' if exact[name] else 'WRONG':>5} {t:>5.0f}us")
            print(f"{m:>4} {k:>5} {n:>5}  {t_fp:>8.0f}  " + "  ".join(cells))


if __name__ == "__main__":
    main()
