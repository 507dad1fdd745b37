"""The ``torch.compile`` backend: ``torch.compile(model, backend="qcompiler", options={...})``.

Dynamo hands us one FX graph per captured region with the model's parameters lifted into
placeholders. We bind those to their tensors and names, run the pass pipeline (which attaches the
quantized weights as buffers), and give the result to Inductor. The compiled model is a snapshot of
the weights at compile time: recompile after changing them.
"""

from __future__ import annotations

import time
import warnings

import torch
import torch.fx as fx

from qcompiler import capture, debug, pipeline, report
from qcompiler.config import BackendOptions
from qcompiler.errors import QCompilerError
from qcompiler.lowering import ops


def _weights_device(bound) -> torch.device:
    for info in bound.values():
        if info.tensor.is_floating_point():
            return info.tensor.device
    return torch.device("cpu")


def _check_inference(example_inputs) -> None:
    if not torch.is_grad_enabled():
        return
    if any(isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs):
        raise QCompilerError(
            "qcompiler compiles models for inference, and gradients are enabled: call the compiled "
            "model under `with torch.inference_mode():` (or torch.no_grad())."
        )


def qcompiler_backend(gm: fx.GraphModule, example_inputs, options=None, mode=None):
    """Dynamo backend entry point (registered as ``qcompiler`` through the ``torch_dynamo_backends`` entry point)."""
    if mode is not None:
        raise QCompilerError(f"qcompiler does not take mode={mode!r}; configure it with options={{...}}")
    opts = BackendOptions.from_user(options)
    _check_inference(example_inputs)
    start = time.perf_counter()
    bound = capture.bind_parameters(gm, example_inputs)
    device = _weights_device(bound)
    rep = report.CompileReport(
        graph_index=report.next_index(),
        recipe=opts.recipe.name,
        kernels=opts.kernels,
        device_note=(ops.kernel_for(device, opts.recipe.weight.bits) if opts.kernels == "fast"
                     else "reference quantize/dequantize ops"),
    )
    steps = pipeline.build(opts, device)
    float_graph = _copy_graph(gm.graph)
    folder = debug.dump_dir(opts.debug)
    dumper = None
    if folder is not None:  # the dumps run the graph eagerly: sizes as ints
        dumper = debug.Dumper(folder, rep.graph_index, gm, capture.concrete_inputs(example_inputs))
    try:
        gm = pipeline.run(gm, steps, rep, dumper)
    except pipeline.PassFailed as exc:
        # A bug of ours must not take the user's model down: run this graph in float, loudly.
        rep.error = str(exc)
        warnings.warn(f"{exc}. This graph runs in float; see qcompiler.last_report().", stacklevel=2)
        gm = fx.GraphModule(gm, float_graph)
    rep.seconds = time.perf_counter() - start
    report.record(rep)
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(fx.GraphModule(gm, gm.graph), example_inputs)


def _copy_graph(graph: fx.Graph) -> fx.Graph:
    copy = fx.Graph()
    copy.output(copy.graph_copy(graph, {}))
    return copy
