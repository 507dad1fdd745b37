"""Inductor's wrapper calls the decode kernels directly, not through PyTorch's dispatcher.

A graph that Inductor compiles calls each custom op of ours from its Python wrapper as
``torch.ops.qcompiler.<op>.default(...)``. That call parses every argument against the op's schema into a boxed
stack, dispatches and unboxes it again: about 2.5 us of Python and C++ around each kernel (measured on a 2-core
Xeon, the op against its direct entry point, same kernel), and a SmolLM2 decode step makes about 150 such calls
(120 GEMVs, 30 attentions, the LM head). ``cpu_calls.cpp`` gives each op a direct entry point with the same
arguments in the same order (a ``METH_FASTCALL`` function that checks them and calls the same C++ function the
op registers); :func:`register` makes Inductor's Python wrapper call those:

    buf3 = extern_kernels.qcompiler_int8_gemv(buf2, 128, arg0_1, arg1_1, arg2_1)

The ops stay what the graphs hold (tracing, fake tensors, eager runs and exports see the same ops as before);
only the line of wrapper code that calls them changes, and the kernel computes the same numbers bit for bit.
The hook is Inductor's table of custom wrapper code for extern kernels (``CUSTOM_EXTERN_KERNEL_CODEGEN``,
keyed by the op's name as the wrapper spells it); where a torch version lacks it, or a call needs the wrapper's
own code (keyword arguments, intermediate hooks for debugging, the FX wrapper), the wrapper calls the op as
before. Inductor's C++ wrapper (``cpp_wrapper``) does not read this table and keeps its own calls. The table is
the process's: a graph with these ops that plain ``torch.compile(backend="inductor")`` compiles after the
kernels are built calls them directly too (without :data:`CACHE_KEY` in its cache key).

Inductor caches the code it generates (on disk, across processes) under a key of the graph and its config, which
does not see this table: :data:`CACHE_KEY`, a graph pass that changes nothing, puts the direct calls (these
sources, and whether they are registered) into that key, so that code cached without them is not reused with
them, nor the other way round (``qcompiler.backend.compile_with_inductor`` passes it to Inductor; where the user
has set ``post_grad_custom_post_pass`` already, theirs stays and their cache key is theirs).
"""

from __future__ import annotations

from pathlib import Path

from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

# the ops with a direct entry point in cpu_calls.cpp (each takes the op's arguments, positionally)
OPS = ("int8_gemv", "int8_weight_gemv", "int4_gemv", "int4_gemv_tiled", "decode_attention", "kron_hadamard")

PREFIX = "qcompiler_"  # the entry points' names in Inductor's extern_kernels namespace


def op_name(op: str) -> str:
    """The op as Inductor's Python wrapper names it (``FallbackKernel.python_kernel_name``)."""
    return f"torch.ops.qcompiler.{op}.default"


def registered() -> bool:
    """Whether Inductor's Python wrapper calls the entry points (:func:`register` ran and this torch has the hook)."""
    try:
        from torch._inductor.codegen.custom_extern_kernel_codegen import CUSTOM_EXTERN_KERNEL_CODEGEN
    except ImportError:
        return False
    return all(op_name(op) in CUSTOM_EXTERN_KERNEL_CODEGEN for op in OPS)


class _CacheKey(CustomGraphPass):
    """Changes nothing in the graph; its uuid (part of Inductor's cache key) names the direct calls' code and
    whether they are on."""

    def __call__(self, graph) -> None:
        return None

    def uuid(self):
        sources = (Path(__file__), Path(__file__).with_name("cpu_calls.cpp"))
        return get_hash_for_files(tuple(str(p) for p in sources)).hex() + (":on" if registered() else ":off")


CACHE_KEY = _CacheKey()


def register(module) -> bool:
    """Put the entry points of ``module`` (the built extension) where generated wrapper code finds them
    (``extern_kernels``) and register the wrapper code that calls them; False where this torch has no such hook."""
    try:
        from torch._inductor.codegen.custom_extern_kernel_codegen import CUSTOM_EXTERN_KERNEL_CODEGEN, CustomCodegen
        from torch._inductor.select_algorithm import extern_kernels
    except ImportError:
        return False
    for op in OPS:
        setattr(extern_kernels, PREFIX + op, getattr(module, op))
        CUSTOM_EXTERN_KERNEL_CODEGEN[op_name(op)] = CustomCodegen(python=_codegen(op))
    return True


def _codegen(op: str):
    def write(node, writeline) -> None:
        from torch._inductor import config
        from torch._inductor.codegen.wrapper import ExternKernelAllocLine
        from torch._inductor.virtualized import V

        args, kwargs = node.codegen_args(), node.codegen_kwargs()
        if kwargs or config.generate_intermediate_hooks or V.graph.fx_wrapper:
            writeline(ExternKernelAllocLine(V.graph.wrapper_code, node))  # the wrapper's own call, as without us
            return
        writeline(f"{node.get_name()} = extern_kernels.{PREFIX}{op}({', '.join(args)})")

    return write
