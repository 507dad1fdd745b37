"""CPU weight-only kernels side by side: ATen's int4 kernel (the one the w4a16 lowering uses) and ATen's
int8 weight-only GEMV, each timed against fp32 F.linear with alternating calls (medians, one process).

    python examples/bench_weight_only_cpu.py
"""

import torch

from qcompiler.lowering.kernels import cpu
from qcompiler.tools.bench import time_pair

CPU = torch.device("cpu")


def main() -> None:
    torch.manual_seed(0)
    for m, n, k in [(1, 4096, 4096), (1, 1536, 576), (16, 4096, 4096)]:
        x, w = torch.randn(m, k), torch.randn(n, k)
        xb = x.bfloat16()
        w_i8 = torch.randint(-8, 8, (n, k), dtype=torch.int8)  # 4-bit values held in int8
        w_scale = torch.rand(n).bfloat16()
        w_int = torch.randint(0, 16, (n, k))
        packed, scale_zeros = cpu.pack_int4_for_cpu(w_int, torch.rand(n, k // 64) * 0.01, torch.full((n, k // 64), 8.0))
        fp32 = lambda: torch.nn.functional.linear(x, w)  # noqa: E731
        kernels = {
            "int8 weight-only (_weight_int8pack_mm, bf16)": lambda: torch.ops.aten._weight_int8pack_mm(xb, w_i8, w_scale),
            "int4 g64 (_weight_int4pack_mm_for_cpu, bf16)":
                lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, 64, scale_zeros),
        }
        with torch.inference_mode():
            row = {name: time_pair(fn, fp32, CPU, repeats=30) for name, fn in kernels.items()}
        print(f"{m} x {n} x {k}: " + ", ".join(f"{name} {t_k * 1e6:.1f} us (fp32 {t_b * 1e6:.1f} us)"
                                              for name, (t_k, t_b) in row.items()))


if __name__ == "__main__":
    main()
