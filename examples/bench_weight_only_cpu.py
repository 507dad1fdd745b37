"""CPU weight-only kernels side by side: ATen's int4 kernel (the one the w4a16 lowering uses), ATen's
int8 weight-only GEMV, and fp32 F.linear, medians in one process.

    python examples/bench_weight_only_cpu.py
"""

import statistics
import time

import torch

from qcompiler.lowering.kernels import cpu


def median_us(fn, repeats: int = 30) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    torch.manual_seed(0)
    for m, n, k in [(1, 4096, 4096), (1, 1536, 576), (16, 4096, 4096)]:
        x, w = torch.randn(m, k), torch.randn(n, k)
        xb = x.bfloat16()
        w_i8 = torch.randint(-8, 8, (n, k), dtype=torch.int8)  # 4-bit values held in int8
        w_scale = torch.rand(n).bfloat16()
        w_int = torch.randint(0, 16, (n, k))
        packed, scale_zeros = cpu.pack_int4_for_cpu(w_int, torch.rand(n, k // 64) * 0.01, torch.full((n, k // 64), 8.0))
        with torch.inference_mode():
            row = {
                "fp32 F.linear": median_us(lambda: torch.nn.functional.linear(x, w)),
                "int8 weight-only (_weight_int8pack_mm, bf16)": median_us(
                    lambda: torch.ops.aten._weight_int8pack_mm(xb, w_i8, w_scale)),
                "int4 g64 (_weight_int4pack_mm_for_cpu, bf16)": median_us(
                    lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, 64, scale_zeros)),
            }
        print(f"{m} x {n} x {k}: " + ", ".join(f"{name} {us:.1f} us" for name, us in row.items()))


if __name__ == "__main__":
    main()
