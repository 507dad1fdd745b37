"""What the backend did to each graph: per-layer decisions, kernels, pass timings.

``qcompiler.last_report()`` returns the report of the most recent graph the backend compiled;
``qcompiler.reports()`` all of them since the last ``qcompiler.clear_reports()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qcompiler.core.ir import LayerDecision


@dataclass
class PassRecord:
    name: str
    seconds: float
    modified: bool
    counts: dict[str, int]


@dataclass
class CompileReport:
    graph_index: int
    recipe: str
    kernels: str
    plan: object = None  # qcompiler.plan.Plan of the graph, once the plan step ran
    layers: list[LayerDecision] = field(default_factory=list)
    kernel_of: dict[str, tuple[str, str]] = field(default_factory=dict)  # module -> (kernel, why)
    passes: list[PassRecord] = field(default_factory=list)
    transforms: dict[str, list[str]] = field(default_factory=dict)  # pass -> what it did per group/layer
    seconds: float = 0.0
    error: str = ""  # set when a pass failed and the graph fell back to float

    @property
    def quantized(self) -> list[LayerDecision]:
        return [d for d in self.layers if d.quantized]

    @property
    def kept_float(self) -> list[LayerDecision]:
        return [d for d in self.layers if not d.quantized]

    def summary(self) -> str:
        if self.error:
            return f"graph {self.graph_index}: kept in float because {self.error}"
        return (
            f"graph {self.graph_index}: recipe {self.recipe}: {len(self.quantized)} linear layers quantized, "
            f"{len(self.kept_float)} kept in float ({self.seconds:.2f} s)"
        )

    def __str__(self) -> str:
        lines = [self.summary()]
        if self.plan is not None and self.plan.kernels:
            used = "; ".join(f"{kernel} ({count} layers)" for kernel, count in self.plan.kernels.items())
            lines.append(f"  kernels: {used}")
        for p in self.passes:
            counts = ", ".join(f"{k}={v}" for k, v in p.counts.items())
            lines.append(f"  pass {p.name:<14} {p.seconds * 1000:8.1f} ms  {counts}")
        for name, notes in self.transforms.items():
            lines.append(f"  {name}:")
            lines.extend(f"    {note}" for note in notes)
        width = max((len(d.module) for d in self.layers), default=10)
        for d in self.layers:
            if d.quantized:
                kernel = self.kernel_of.get(d.module, ("quantize/dequantize graph", ""))[0]
                extra = f" [{d.reason}]" if d.reason else ""
                lines.append(f"  {d.module:<{width}}  {d.scheme}  {d.bits_per_weight:.2f} bpw  -> {kernel}{extra}")
            else:
                lines.append(f"  {d.module:<{width}}  float: {d.reason}")
        return "\n".join(lines)


_reports: list[CompileReport] = []


def record(report: CompileReport) -> None:
    _reports.append(report)


def next_index() -> int:
    return len(_reports)


def last_report() -> CompileReport | None:
    return _reports[-1] if _reports else None


def reports() -> list[CompileReport]:
    return list(_reports)


def clear_reports() -> None:
    _reports.clear()
