"""The numeric debugger: where does quantization error come from? Per pass, per layer, per kept layer.

:func:`compare` captures the model once, runs the pipeline step by step on the quantize/dequantize
graph, and reports the error at the logits after each pass, the error of each quantized linear's output
against the float model's, and, for the worst layers, how much the logits' KL drops when that layer
alone stays in float. ``qcompiler explain`` prints it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from qcompiler import backend, pipeline
from qcompiler.config import BackendOptions
from qcompiler.core import capture
from qcompiler.core.errors import ConfigError
from qcompiler.core.ir import FLOAT_WEIGHT, LINEAR, QLINEAR
from qcompiler.dump import copy_graph, node_values, sqnr_db
from qcompiler.report import CompileReport
from qcompiler.tools.metrics import next_token_divergence


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


def main_output(values):
    """The graph output that looks like logits: the floating tensor with the most elements."""
    flat = [v for v in torch.utils._pytree.tree_leaves(values) if isinstance(v, torch.Tensor) and v.is_floating_point()]
    if not flat:
        raise ConfigError("the model's graph returns no floating-point tensor to compare")
    return max(flat, key=lambda t: t.numel())


def _logit_metrics(ref: torch.Tensor, out: torch.Tensor) -> tuple[float, float, float]:
    kl, agree = next_token_divergence(ref, out)
    return sqnr_db(ref, out), kl.mean().item(), agree.double().mean().item()


def fresh_graph(gm: fx.GraphModule, inputs) -> fx.GraphModule:
    new = fx.GraphModule(gm, copy_graph(gm.graph))
    capture.bind_parameters(new, inputs)
    return new


def _run_output(gm, inputs):
    with torch.inference_mode():
        return main_output(gm(*inputs))


def _qdq_graph(gm0, inputs, steps) -> fx.GraphModule:
    return pipeline.run(fresh_graph(gm0, inputs), steps, CompileReport(0, "", "reference"))


def float_args(node: fx.Node) -> tuple:
    """The arguments of a QDQ linear ``node`` that make it read its float input and float weight again
    (the recipe's transforms before ``insert_qdq`` stay)."""
    dq, q = torch.ops.qcompiler.dequantize.default, torch.ops.qcompiler.quantize.default
    x = node.args[0]
    if x.op == "call_function" and x.target is dq and x.args[0].target is q:
        x = x.args[0].args[0]
    if x.op == "call_function" and x.target is torch.mul and getattr(x.args[1], "target", "").endswith("_x_inv_scale"):
        x = x.args[0]  # AWQ's 1/s belongs to the rounded weight
    return (x, node.meta[FLOAT_WEIGHT]) + tuple(node.args[2:])


def _keep_in_float(gm: fx.GraphModule, module: str) -> None:
    """Make every QDQ linear of ``module`` read its float input and float weight again."""
    for node in gm.graph.nodes:
        spec = node.meta.get(QLINEAR)
        if spec is not None and spec.module == module:
            node.args = float_args(node)
    gm.recompile()


def _layer_errors(gm: fx.GraphModule, inputs, float_values: dict) -> list[LayerError]:
    """Each quantized linear's output against the float graph's value of the same node."""
    values = node_values(gm, inputs)
    errors = []
    for node in gm.graph.nodes:
        site = node.meta.get(LINEAR)
        if site is None or QLINEAR not in node.meta or node.name not in float_values:
            continue
        ref, val = float_values[node.name], values[node.name]
        errors.append(LayerError(site.module, sqnr_db(ref, val), (ref.double() - val.double()).pow(2).mean().item()))
    return errors


def _run_steps(gm0, inputs, steps, recipe_name: str, reference_out):
    """The pipeline one step at a time: the final graph, the logits' error after each pass, the layers' errors."""
    gm = fresh_graph(gm0, inputs)
    report, per_pass, layers, float_values = CompileReport(0, recipe_name, "reference"), [], [], None
    for step in steps:
        gm = pipeline.run(gm, [step], report)
        if step.name == "canonicalize":
            float_values = node_values(gm, inputs)
        if step.name == "insert_qdq" and float_values is not None:
            layers = _layer_errors(gm, inputs, float_values)
        per_pass.append(PassError(step.name, *_logit_metrics(reference_out, _run_output(gm, inputs))))
    return gm, per_pass, layers


def compare(model: torch.nn.Module, recipe="w8a8-dynamic", batch=None, stats=None, top: int = 5,
            steps=None, other_weights: bool = False) -> Comparison:
    """Where does quantization error come from? Per pass and per layer, on one ``batch``.

    ``batch``: input ids (or a dict of keyword inputs, or a tuple of positional ones). ``top``: how
    many of the worst layers to attribute by keeping each alone in float (0: none): the layer's QDQ
    is undone in the quantize/dequantize graph (the recipe's transforms stay, so the rest of the
    model is exactly as quantized). ``steps``: override the pipeline (for testing a pass). Statistics
    gathered on other weights are an error unless ``other_weights``. The model is not changed.
    """
    if batch is None:
        raise ConfigError("compare needs a batch to run, e.g. a [1, T] tensor of input ids")
    opts = backend.resolve(BackendOptions(recipe=recipe, stats=stats, other_weights=other_weights))
    backend.check_made_from(opts, model.named_parameters())
    gm0, calls = capture.capture(model, [capture.as_batch(batch)], what="the numeric debugger")
    inputs = calls[0]
    reference_out = _run_output(gm0, inputs)
    device = next((x.device for x in inputs if isinstance(x, torch.Tensor)), torch.device("cpu"))
    steps = steps or pipeline.build(opts.recipe, device, stats=opts.stats, kernels=opts.kernels)
    gm, per_pass, layers = _run_steps(gm0, inputs, steps, opts.recipe.name, reference_out)
    final_kl = _logit_metrics(reference_out, _run_output(gm, inputs))[1]
    layers.sort(key=lambda e: e.sqnr_db)
    result = Comparison(opts.recipe.name, layers, per_pass, [], final_kl)
    if top:
        # keep one layer in float: in the QDQ graph, that layer reads its float input and float weight
        upto = steps[: next(i for i, s in enumerate(steps) if s.name == "insert_qdq") + 1]
        base_kl = _logit_metrics(reference_out, _run_output(_qdq_graph(gm0, inputs, upto), inputs))[1]
        for e in layers[:top]:
            gm_k = _qdq_graph(gm0, inputs, upto)
            _keep_in_float(gm_k, e.module)
            kl = _logit_metrics(reference_out, _run_output(gm_k, inputs))[1]
            result.attribution.append(Attribution(e.module, kl, base_kl - kl))
    result.attribution.sort(key=lambda a: -a.kl_gain)
    return result
