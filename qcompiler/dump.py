"""Pass-by-pass dumps: what each pass did to the graph, and what it did to the numbers.

Turned on with ``options={"debug": DIR}`` or the environment variable ``QCOMPILER_DUMP=DIR``. For
graph ``G`` the backend writes ``DIR/graph_G/NN_<pass>/``:

- ``before.py`` / ``after.py``: the graph as readable Python code before and after the pass;
- ``diff.txt``: a unified diff of the two;
- ``summary.json``: the pass's time, match counts, whether it changed the graph, the passes before it;
- ``errors.tsv``: per node of the graph after the pass that also exists in the float graph, on the
  graph's first real inputs: SQNR in dB against the float model's value of that node, max absolute
  error, and the node's shape (nodes whose values cannot be compared are listed with why);
- ``FAILED.txt`` instead, when the pass raised, with the error and the passes that ran before it.

``DIR/graph_G/float.py`` is the captured graph before any pass.

The numeric debugger built on the same per-node values (per-pass error at the logits, per-layer error,
"keep one layer in float" attribution) is :mod:`qcompiler.tools.compare`.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from pathlib import Path

import torch
import torch.fx as fx

ENV = "QCOMPILER_DUMP"


def dump_dir(option) -> Path | None:
    """The dump folder: the ``debug`` option, else ``$QCOMPILER_DUMP``, else None."""
    value = option if option is not None else os.environ.get(ENV)
    return Path(value) if value else None


def node_values(gm: fx.GraphModule, inputs) -> dict[str, object]:
    """Every node's value by node name, running ``gm`` once on ``inputs``."""
    out: dict[str, object] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            if isinstance(value, torch.Tensor):
                out[n.name] = value.detach()
            return value

    with torch.inference_mode():
        Recorder(gm).run(*inputs)
    return out


def sqnr_db(reference: torch.Tensor, value: torch.Tensor) -> float:
    """``10 log10(|ref|^2 / |ref - value|^2)``; inf when equal."""
    ref, val = reference.double(), value.double()
    noise = (ref - val).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10 * math.log10(signal / noise)


def compare_values(reference: dict, values: dict) -> list[tuple[str, str, str, str]]:
    """Rows ``(node, sqnr_db, max_abs_error, shape or why not compared)``."""
    rows = []
    for name, value in values.items():
        ref = reference.get(name)
        if ref is None:
            continue
        if not (ref.is_floating_point() and value.is_floating_point()):
            continue
        if ref.shape != value.shape:
            rows.append((name, "", "", f"shape {tuple(value.shape)} vs float {tuple(ref.shape)}"))
            continue
        if ref.numel() == 0:
            continue
        err = (ref.double() - value.double()).abs().max().item()
        rows.append((name, f"{sqnr_db(ref, value):.2f}", f"{err:.4g}", str(tuple(value.shape))))
    return rows


class Dumper:
    """Writes the files above for one graph; the pipeline calls :meth:`before` and :meth:`after`."""

    def __init__(self, root: Path, graph_index: int, gm: fx.GraphModule, example_inputs) -> None:
        self.folder = Path(root) / f"graph_{graph_index}"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.inputs = [x for x in example_inputs]
        self.count = 0
        self._code = ""
        (self.folder / "float.py").write_text(gm.code)
        try:
            self.reference = node_values(fx.GraphModule(gm, copy_graph(gm.graph)), self.inputs)
            self.reference_error = ""
        except Exception as exc:  # the float graph always runs under Dynamo; this is for odd inputs
            self.reference, self.reference_error = {}, f"{type(exc).__name__}: {exc}"

    def _step_folder(self, name: str) -> Path:
        folder = self.folder / f"{self.count:02d}_{name}"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def before(self, gm: fx.GraphModule) -> None:
        gm.recompile()
        self._code = gm.code

    def after(self, name: str, gm: fx.GraphModule, seconds: float, modified: bool, counts: dict,
              done: list[str]) -> None:
        self.count += 1
        folder = self._step_folder(name)
        after = gm.code
        (folder / "before.py").write_text(self._code)
        (folder / "after.py").write_text(after)
        diff = difflib.unified_diff(self._code.splitlines(), after.splitlines(), "before.py", "after.py", lineterm="")
        (folder / "diff.txt").write_text("\n".join(diff) + "\n")
        summary = {"pass": name, "seconds": seconds, "modified": modified, "counts": counts, "after": list(done)}
        (folder / "summary.json").write_text(json.dumps(summary, indent=1))
        lines = ["node\tsqnr_db\tmax_abs_error\tshape"]
        if self.reference_error:
            lines.append(f"# the float graph did not run on the example inputs: {self.reference_error}")
        else:
            try:
                rows = compare_values(self.reference, node_values(gm, self.inputs))
                lines += ["\t".join(r) for r in rows]
            except Exception as exc:
                lines.append(f"# the graph after {name} did not run on the example inputs: {type(exc).__name__}: {exc}")
        (folder / "errors.tsv").write_text("\n".join(lines) + "\n")

    def failed(self, name: str, message: str, done: list[str]) -> None:
        self.count += 1
        folder = self._step_folder(name)
        (folder / "before.py").write_text(self._code)
        (folder / "FAILED.txt").write_text(f"pass {name!r} failed after {done or 'no passes'}:\n{message}\n")


def copy_graph(graph: fx.Graph) -> fx.Graph:
    new = fx.Graph()
    new.output(new.graph_copy(graph, {}))
    return new
