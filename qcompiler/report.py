"""What the backend did to each graph: per-layer decisions, kernels, pass timings.

``qcompiler.last_report()`` returns the report of the most recent graph the backend compiled;
``qcompiler.reports()`` those since the last ``qcompiler.clear_reports()``, at most the last
:data:`MAX_REPORTS` of them: the process keeps no more, so a long-running process that recompiles
(new shapes, many models) does not hold every graph's report forever.
"""

from __future__ import annotations

from collections import deque
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


MAX_REPORTS = 256  # reports kept in the process; older ones are dropped
_reports: deque[CompileReport] = deque(maxlen=MAX_REPORTS)
_recorded = 0  # reports recorded since the last clear_reports, dropped ones included


def record(report: CompileReport) -> None:
    global _recorded
    _reports.append(report)
    _recorded += 1


def next_index() -> int:
    """The graph index of the next report: how many were recorded since the last :func:`clear_reports`."""
    return _recorded


def last_report() -> CompileReport | None:
    return _reports[-1] if _reports else None


def reports() -> list[CompileReport]:
    """The reports since the last :func:`clear_reports`, oldest first: the last :data:`MAX_REPORTS` of them."""
    return list(_reports)


def clear_reports() -> None:
    global _recorded
    _reports.clear()
    _recorded = 0
