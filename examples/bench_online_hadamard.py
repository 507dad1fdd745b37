"""The online Hadamard transform of a rotated model's down projection, one decode row, as a compiled graph
calls it: the rotation pass's graph ops (a row viewed as ``[m, p]``, two small GEMMs, the views back) compiled
by Inductor, against the C++ ``qcompiler::kron_hadamard`` in a compiled graph. Interleaved, medians, in one
process; the layer-sized loop runs ``--layers`` transforms per call, as a decode step does.

    python examples/bench_online_hadamard.py --width 1536 --layers 30
"""

import argparse
import json
import sys

import torch

from qcompiler.core import hadamard
from qcompiler.lowering.kernels import native
from qcompiler.tools.timing import machine_name, time_interleaved


class GraphOps(torch.nn.Module):
    """``x @ kron(A, B)`` for ``layers`` inputs, in the ops ``passes/rotate.py`` writes."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("a", a)
        self.register_buffer("b", b)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        m, p = self.a.shape[0], self.b.shape[0]
        return [((x.unflatten(-1, (m, p)) @ self.b).transpose(-1, -2) @ self.a).transpose(-1, -2).flatten(-2)
                for x in xs]


class Fused(GraphOps):
    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.ops.qcompiler.kron_hadamard(x, self.a, self.b) for x in xs]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1536, help="the down projection's input width (SmolLM2: 1536)")
    parser.add_argument("--layers", type=int, default=30, help="transforms per call (SmolLM2: 30 layers)")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--json", dest="json_out")
    args = parser.parse_args(argv)
    why = native.unavailable_reason()
    if why is not None:
        raise SystemExit(why)
    a, b = (t.float() for t in hadamard.kron_parts(args.width))
    xs = [torch.randn(1, 1, args.width) for _ in range(args.layers)]
    graph_ops, fused = torch.compile(GraphOps(a, b)), torch.compile(Fused(a, b))
    with torch.inference_mode():
        for got, want in zip(fused(xs), graph_ops(xs)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        medians = time_interleaved({"graph ops": lambda: graph_ops(xs), "kron_hadamard": lambda: fused(xs)},
                                   args.repeats, warmup=5)
    per = {name: 1e6 * t / args.layers for name, t in medians.items()}
    print(f"{machine_name()}, {torch.get_num_threads()} threads; width {args.width} "
          f"(A {tuple(a.shape)}, B {tuple(b.shape)}), {args.layers} transforms per call, median of {args.repeats}")
    for name, us in per.items():
        print(f"  {name:<14} {us:7.2f} us per transform, {us * args.layers / 1e3:.3f} ms per {args.layers}")
    print(f"  ratio {per['graph ops'] / per['kron_hadamard']:.2f}x")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"cpu": machine_name(), "threads": torch.get_num_threads(), "width": args.width,
                       "layers": args.layers, "repeats": args.repeats, "us_per_transform": per}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
