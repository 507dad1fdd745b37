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

:func:`compare` is the numeric debugger: per-pass error at the logits, per-layer error of each
quantized linear's output, and "keep one layer in float" attribution for the worst layers.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.fx as fx

ENV = "QCOMPILER_DUMP"


def dump_dir(option) -> Path | None:
    """The dump folder: the ``debug`` option, else ``$QCOMPILER_DUMP``, else None."""
    value = option if option is not None else os.environ.get(ENV)
    return Path(value) if value else None


def _values(gm: fx.GraphModule, inputs) -> dict[str, object]:
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
            self.reference = _values(fx.GraphModule(gm, _copy(gm.graph)), self.inputs)
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
                rows = compare_values(self.reference, _values(gm, self.inputs))
                lines += ["\t".join(r) for r in rows]
            except Exception as exc:
                lines.append(f"# the graph after {name} did not run on the example inputs: {type(exc).__name__}: {exc}")
        (folder / "errors.tsv").write_text("\n".join(lines) + "\n")

    def failed(self, name: str, message: str, done: list[str]) -> None:
        self.count += 1
        folder = self._step_folder(name)
        (folder / "before.py").write_text(self._code)
        (folder / "FAILED.txt").write_text(f"pass {name!r} failed after {done or 'no passes'}:\n{message}\n")


def _copy(graph: fx.Graph) -> fx.Graph:
    new = fx.Graph()
    new.output(new.graph_copy(graph, {}))
    return new


# --- numeric debugger ------------------------------------------------------------------------------


@dataclass
class LayerError:
    module: str
    sqnr_db: float  # of the layer's output in the quantized graph against the float model's
    mse: float


@dataclass
class PassError:
    name: str
    sqnr_db: float  # of the graph's main output (the logits) after the pass, against float
    kl: float  # mean KL(float || quantized) of the softmax over the output's last dim
    top1_agreement: float


@dataclass
class Attribution:
    module: str
    kl_with_layer_in_float: float
    kl_gain: float  # how much the logits' KL (of the QDQ graph) drops when only this layer stays float


@dataclass
class Comparison:
    recipe: str
    layers: list = field(default_factory=list)  # LayerError, worst first
    passes: list = field(default_factory=list)  # PassError, in pipeline order
    attribution: list = field(default_factory=list)  # Attribution, largest gain first
    kl: float = 0.0

    def __str__(self) -> str:
        lines = [f"recipe {self.recipe}: KL at the logits {self.kl:.4g}", "", "per pass (logits vs float):",
                 f"  {'pass':<16} {'SQNR dB':>8} {'KL':>10} {'top-1':>7}"]
        for p in self.passes:
            lines.append(f"  {p.name:<16} {p.sqnr_db:>8.2f} {p.kl:>10.4g} {100 * p.top1_agreement:>6.1f}%")
        lines += ["", "per layer (output vs float), worst first:", f"  {'layer':<44} {'SQNR dB':>8} {'MSE':>10}"]
        for e in self.layers:
            lines.append(f"  {e.module:<44} {e.sqnr_db:>8.2f} {e.mse:>10.4g}")
        if self.attribution:
            lines += ["", "keep one layer in float (logits KL):",
                      f"  {'layer':<44} {'KL':>10} {'gain':>10}"]
            for a in self.attribution:
                lines.append(f"  {a.module:<44} {a.kl_with_layer_in_float:>10.4g} {a.kl_gain:>10.4g}")
        return "\n".join(lines)


def _main_output(values):
    """The graph output that looks like logits: the floating tensor with the most elements."""
    flat = [v for v in torch.utils._pytree.tree_leaves(values) if isinstance(v, torch.Tensor) and v.is_floating_point()]
    if not flat:
        raise ValueError("the model's graph returns no floating-point tensor to compare")
    return max(flat, key=lambda t: t.numel())


def _logit_metrics(ref: torch.Tensor, out: torch.Tensor) -> tuple[float, float, float]:
    logp_f = torch.log_softmax(ref.double().reshape(-1, ref.shape[-1]), -1)
    logp_q = torch.log_softmax(out.double().reshape(-1, out.shape[-1]), -1)
    kl = (logp_f.exp() * (logp_f - logp_q)).sum(-1).mean().item()
    top1 = (logp_f.argmax(-1) == logp_q.argmax(-1)).double().mean().item()
    return sqnr_db(ref, out), kl, top1


def capture_graph(model: torch.nn.Module, batch):
    """The FX graph Dynamo captures for ``model(batch)`` (one graph) and its example inputs."""
    from qcompiler import capture

    captured = []

    def backend(gm, example_inputs, **_):
        captured.append((gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    with torch.inference_mode():
        compiled = torch.compile(model, backend=backend)
        if isinstance(batch, Mapping):
            compiled(**batch)
        elif isinstance(batch, (tuple, list)):
            compiled(*batch)
        else:
            compiled(batch)
    torch._dynamo.reset()
    if len(captured) != 1:
        raise ValueError(f"compare needs the model captured as one graph, Dynamo made {len(captured)}")
    gm, inputs = captured[0]
    capture.bind_parameters(gm, inputs)
    return gm, inputs


def _fresh(gm: fx.GraphModule, inputs) -> fx.GraphModule:
    from qcompiler import capture

    new = fx.GraphModule(gm, _copy(gm.graph))
    capture.bind_parameters(new, inputs)
    return new


def _run_output(gm, inputs):
    with torch.inference_mode():
        return _main_output(gm(*inputs))


def _qdq_graph(gm0, inputs, steps) -> fx.GraphModule:
    from qcompiler import pipeline
    from qcompiler.report import CompileReport

    return pipeline.run(_fresh(gm0, inputs), steps, CompileReport(0, "", "reference"))


def _keep_in_float(gm: fx.GraphModule, module: str) -> None:
    """Make every QDQ linear of ``module`` read its float input and float weight again."""
    from qcompiler.ir import FLOAT_WEIGHT, QLINEAR

    dq, q = torch.ops.qcompiler.dequantize.default, torch.ops.qcompiler.quantize.default
    for node in gm.graph.nodes:
        spec = node.meta.get(QLINEAR)
        if spec is None or spec.module != module:
            continue
        x = node.args[0]
        if x.op == "call_function" and x.target is dq and x.args[0].target is q:
            x = x.args[0].args[0]
        if x.op == "call_function" and x.target is torch.mul and getattr(x.args[1], "target", "").endswith("_x_inv_scale"):
            x = x.args[0]  # AWQ's 1/s belongs to the rounded weight
        node.args = (x, node.meta[FLOAT_WEIGHT]) + tuple(node.args[2:])
    gm.recompile()


def compare(model: torch.nn.Module, recipe="w8a8-dynamic", batch=None, stats=None, top: int = 5,
            steps=None) -> Comparison:
    """Where does quantization error come from? Per pass and per layer, on one ``batch``.

    ``batch``: input ids (or a dict of keyword inputs, or a tuple of positional ones). ``top``: how
    many of the worst layers to attribute by keeping each alone in float (0: none): the layer's QDQ
    is undone in the quantize/dequantize graph (the recipe's transforms stay, so the rest of the
    model is exactly as quantized). ``steps``: override the pipeline (for testing a pass). The model
    is not changed.
    """
    from qcompiler import pipeline
    from qcompiler.config import BackendOptions
    from qcompiler.ir import LINEAR, QLINEAR
    from qcompiler.report import CompileReport

    if batch is None:
        raise ValueError("compare needs a batch to run, e.g. a [1, T] tensor of input ids")
    options = BackendOptions(recipe=recipe, stats=stats)
    gm0, inputs = capture_graph(model, batch)
    reference_out = _run_output(gm0, inputs)

    def run_pipeline(opts, record_passes: bool):
        gm = _fresh(gm0, inputs)
        device = next((x.device for x in inputs if isinstance(x, torch.Tensor)), torch.device("cpu"))
        build = steps or pipeline.build(opts, device)
        report, per_pass, layer_values = CompileReport(0, opts.recipe.name, opts.kernels), [], None
        float_values = None
        for step in build:
            gm = pipeline.run(gm, [step], report)
            if step.name == "canonicalize":
                float_values = _values(gm, inputs)
            if step.name == "insert_qdq" and float_values is not None:
                values = _values(gm, inputs)
                layer_values = []
                for node in gm.graph.nodes:
                    site = node.meta.get(LINEAR)
                    if site is None or QLINEAR not in node.meta or node.name not in float_values:
                        continue
                    ref, val = float_values[node.name], values[node.name]
                    mse = (ref.double() - val.double()).pow(2).mean().item()
                    layer_values.append(LayerError(site.module, sqnr_db(ref, val), mse))
            if record_passes:
                per_pass.append(PassError(step.name, *_logit_metrics(reference_out, _run_output(gm, inputs))))
        return gm, per_pass, layer_values or []

    gm, per_pass, layers = run_pipeline(options, True)
    final_kl = _logit_metrics(reference_out, _run_output(gm, inputs))[1]
    layers.sort(key=lambda e: e.sqnr_db)
    result = Comparison(options.recipe.name, layers, per_pass, [], final_kl)
    if top:
        # keep one layer in float: in the QDQ graph, that layer reads its float input and float weight
        upto = []
        for step in (steps or pipeline.build(options, torch.device("cpu"))):
            upto.append(step)
            if step.name == "insert_qdq":
                break
        base = _qdq_graph(gm0, inputs, upto)
        base_kl = _logit_metrics(reference_out, _run_output(base, inputs))[1]
        for e in layers[:top]:
            gm_k = _qdq_graph(gm0, inputs, upto)
            _keep_in_float(gm_k, e.module)
            kl = _logit_metrics(reference_out, _run_output(gm_k, inputs))[1]
            result.attribution.append(Attribution(e.module, kl, base_kl - kl))
    result.attribution.sort(key=lambda a: -a.kl_gain)
    return result
