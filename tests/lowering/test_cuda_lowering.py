"""The CUDA half of the lowering, without a GPU.

- The ops the CUDA lowering emits (``quantize_per_token``, ``int8_linear``, ``int4_gemm_reference``):
  their CPU references against ``qcompiler.core.primitives`` / ``kernels/reference.py``, and opcheck.
- The CUDA dispatch wrappers in ``ops`` called as plain functions on CPU tensors, so their Triton
  kernels run under the interpreter (leading dims, uint8 zero points), against the references.
- ``fuse.lower(gm, device=cuda)`` on graphs built from CPU tensors: which ops it emits, what it
  reports, and the lowered graph run with the CUDA implementations (``run_with_cuda_impls``)
  against the QDQ graph it replaced.
"""

import pytest
import torch
import torch.fx as fx
from graphs import capture_graph, tiny_llama

import qcompiler
from qcompiler import pipeline, primitives, report
from qcompiler.config import ActivationScheme, BackendOptions, LayerOverride, Recipe, WeightScheme
from qcompiler.lowering import fuse, int4, ops
from qcompiler.lowering.kernels import reference
from qcompiler.lowering.kernels.autotune import interpreting
from qcompiler.lowering.key import Layer

CUDA = torch.device("cuda")
needs_interpreter = pytest.mark.skipif(not interpreting(), reason="needs TRITON_INTERPRET=1 (set by conftest)")

_Q = torch.ops.qcompiler


def _calls(gm: fx.GraphModule, packet) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and getattr(n.target, "overloadpacket", n.target) is packet]


_CUDA_IMPLS = {
    _Q.quantize_per_token: ops._quantize_per_token_cuda,
    _Q.int8_linear: ops._int8_linear_cuda,
    _Q.int8_gemm: ops._cuda_kernel,
    _Q.int4_gemm: ops._int4_cuda,
}


class _CudaImpls(fx.Interpreter):
    """Runs a graph with each ``qcompiler::`` op's CUDA implementation (Triton, interpreted on CPU tensors)."""

    def call_function(self, target, args, kwargs):
        impl = _CUDA_IMPLS.get(getattr(target, "overloadpacket", target))
        return impl(*args, **kwargs) if impl is not None else super().call_function(target, args, kwargs)


def run_with_cuda_impls(gm, inputs):
    with torch.inference_mode():
        return _CudaImpls(gm).run(*inputs)


def _qdq(model, args, recipe, stats=None):
    """The graph the backend would lower (``kernels="reference"`` stops before ``lower``), its inputs and output."""
    gm, inputs = capture_graph(model, *args)
    opts = BackendOptions.from_user({"recipe": recipe, "kernels": "reference", "stats": stats})
    gm = pipeline.run(gm, pipeline.build(opts.recipe, torch.device("cpu"), stats=opts.stats, kernels=opts.kernels), report.CompileReport(0, "test", "reference"))
    with torch.inference_mode():
        out = gm(*inputs)
    return gm, inputs, out


def _logits(out):
    return out[0] if isinstance(out, (tuple, list)) else out


# --- ops -------------------------------------------------------------------------------------------


def _primitive_per_token(x, smooth):
    xs = x.float() / smooth.float() if smooth is not None else x.float()
    block = primitives.per_token(x.dim())
    scale, _ = primitives.choose_qparams_math(xs, block, -127, 127, True)
    return primitives.quantize_math(xs, scale, None, block, -127, 127, torch.int8), scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_smooth", [False, True])
def test_quantize_per_token_op_is_the_primitives_and_passes_opcheck(dtype, with_smooth):
    x = (torch.randn(2, 3, 40) * torch.logspace(-2, 2, 40)).to(dtype)
    x[0, 1] = 0  # a zero row: the minimum scale
    smooth = (torch.rand(40) + 0.5).to(dtype) if with_smooth else None
    q, scale = ops.quantize_per_token(x, smooth)
    ref_q, ref_scale = _primitive_per_token(x, smooth)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (2, 3, 1)
    assert torch.equal(q, ref_q) and torch.equal(scale, ref_scale)
    torch.library.opcheck(ops.quantize_per_token, (x, smooth))


def test_quantize_per_token_op_checks_its_inputs():
    with pytest.raises(TypeError, match="float x"):
        ops.quantize_per_token(torch.zeros(2, 4, dtype=torch.int8), None)
    with pytest.raises(ValueError, match="K=4"):
        ops.quantize_per_token(torch.zeros(2, 4), torch.ones(5))


def _int8_problem(act_dtype=torch.int8, rows=(2, 3), k=40, n=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lo, hi = (-127, 128) if act_dtype == torch.int8 else (0, 256)
    x_q = torch.randint(lo, hi, (*rows, k), generator=gen).to(act_dtype)
    w_q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    w_scale = torch.rand(n, generator=gen) * 0.01 + 1e-4
    return x_q, w_q, w_scale


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_int8_linear_op_reference_and_opcheck(out_dtype):
    x_q, w_q, w_scale = _int8_problem()
    x_scale, bias = torch.rand(2, 3, 1) + 0.01, torch.randn(24)
    y = ops.int8_linear(x_q, x_scale, 0, w_q, w_scale, None, bias, out_dtype)
    expected = reference.int8_gemm(x_q, 0, w_q, w_scale) * x_scale + bias
    assert y.dtype == out_dtype and y.shape == (2, 3, 24)
    torch.testing.assert_close(y, expected.to(out_dtype), rtol=0, atol=0)
    torch.library.opcheck(ops.int8_linear, (x_q, x_scale, 0, w_q, w_scale, None, bias, out_dtype))
    # uint8 activations with a zero point and a per-tensor scale (the static asymmetric scheme)
    x_u8, w_q, w_scale = _int8_problem(torch.uint8)
    colsum = w_q.sum(1, dtype=torch.int32)
    args = (x_u8, torch.full((1, 1, 1), 0.03), 7, w_q, w_scale, colsum, None, out_dtype)
    torch.testing.assert_close(ops.int8_linear(*args), (reference.int8_gemm(x_u8, 7, w_q, w_scale) * 0.03).to(out_dtype),
                               rtol=0, atol=0)
    torch.library.opcheck(ops.int8_linear, args)


def test_int8_linear_op_checks_its_inputs():
    x_q, w_q, w_scale = _int8_problem()
    with pytest.raises(ValueError, match="one per row"):
        ops.int8_linear(x_q, torch.ones(5), 0, w_q, w_scale, None, None, torch.float32)
    with pytest.raises(ValueError, match="w_colsum must be int32"):
        ops.int8_linear(x_q, torch.ones(1), 0, w_q, w_scale, torch.zeros(24), None, torch.float32)
    with pytest.raises(TypeError, match="out_dtype"):
        ops.int8_linear(x_q, torch.ones(1), 0, w_q, w_scale, None, None, torch.float64)


def test_int4_gemm_reference_op_passes_opcheck():
    packed = reference.pack_int4(torch.randint(0, 16, (16, 48)))
    scale, zero = torch.rand(16, 3) + 0.1, torch.randint(0, 16, (16, 3)).float()
    x = torch.randn(2, 3, 48)
    y = ops.int4_gemm_reference(x, packed, scale, zero, 16)
    torch.testing.assert_close(y, reference.int4_gemm(x.reshape(6, 48), packed, scale, zero, 16).reshape(2, 3, 16))
    torch.library.opcheck(ops.int4_gemm_reference, (x, packed, scale, zero, 16))


# --- the CUDA dispatch wrappers, run as functions under the interpreter ------------------------------


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_quantize_wrapper_keeps_leading_dims_and_is_bit_exact(dtype):
    x = (torch.randn(2, 3, 77) * 3).to(dtype)
    smooth = (torch.rand(77) + 0.5).to(dtype)
    for s in (None, smooth):
        q, scale = ops._quantize_per_token_cuda(x, s)
        ref_q, ref_scale = ops._quantize_per_token_reference(x, s)
        assert q.shape == x.shape and scale.shape == (2, 3, 1)
        assert torch.equal(q, ref_q) and torch.equal(scale, ref_scale)


@needs_interpreter
def test_cuda_int8_linear_wrapper_matches_the_reference():
    # int8, per-row scales, fp32 out, no bias: the kernel's epilogue is the reference's arithmetic
    x_q, w_q, w_scale = _int8_problem(rows=(2, 5))
    x_scale = torch.rand(2, 5, 1) + 0.01
    got = ops._int8_linear_cuda(x_q, x_scale, 0, w_q, w_scale, None, None, torch.float32)
    assert got.shape == (2, 5, 24)
    assert torch.equal(got, ops._int8_linear_reference(x_q, x_scale, 0, w_q, w_scale, None, None, torch.float32))
    # uint8 with a zero point, the precomputed column sums, a per-tensor scale, bias, fp16 out
    x_u8, w_q, w_scale = _int8_problem(torch.uint8, rows=(4, 1))
    args = (x_u8, torch.full((1, 1, 1), 0.02), 131, w_q, w_scale, w_q.sum(1, dtype=torch.int32), torch.randn(24),
            torch.float16)
    got = ops._int8_linear_cuda(*args)
    assert got.shape == (4, 1, 24) and got.dtype == torch.float16
    torch.testing.assert_close(got, ops._int8_linear_reference(*args), rtol=1e-3, atol=1e-3)


@needs_interpreter
@pytest.mark.parametrize("act_dtype,zero_point", [(torch.int8, 0), (torch.uint8, 0), (torch.uint8, 200)])
def test_cuda_int8_gemm_wrapper_keeps_leading_dims_and_is_exact(act_dtype, zero_point):
    x_q, w_q, w_scale = _int8_problem(act_dtype, rows=(3, 2, 2))
    got = ops._cuda_kernel(x_q, zero_point, w_q, w_scale, 0)
    assert got.shape == (3, 2, 2, 24)
    assert torch.equal(got, reference.int8_gemm(x_q, zero_point, w_q, w_scale))


@needs_interpreter
def test_cuda_int4_wrapper_keeps_leading_dims_and_matches_the_reference():
    packed = reference.pack_int4(torch.randint(0, 16, (24, 128)))
    scale, zero = torch.rand(24, 2) * 0.1 + 1e-3, torch.randint(0, 16, (24, 2)).float()
    x = torch.randn(2, 3, 128)
    got = ops._int4_cuda(x, packed, scale, zero, 64)
    assert got.shape == (2, 3, 24)
    torch.testing.assert_close(got, ops._int4_reference(x, packed, scale, zero, 64), rtol=1e-5, atol=1e-4)
    x_t = torch.randn(128, 2).t()  # non-contiguous input
    torch.testing.assert_close(ops._int4_cuda(x_t, packed, scale, zero, 64),
                               ops._int4_reference(x_t, packed, scale, zero, 64), rtol=1e-5, atol=1e-4)


# --- fuse.lower for CUDA, on graphs of CPU tensors -------------------------------------------------


@needs_interpreter
def test_dynamic_w8a8_on_cuda_is_two_triton_ops_per_layer_and_matches_the_qdq_graph():
    ids = torch.randint(0, 128, (2, 8))
    gm, inputs, qdq_out = _qdq(tiny_llama(), (ids,), "w8a8-dynamic")
    result = fuse.lower(gm, device=CUDA)
    assert result.counts == {"lowered": 14, "not_lowered": 0}
    assert len(_calls(gm, _Q.quantize_per_token)) == 14 and len(_calls(gm, _Q.int8_linear)) == 14
    assert not _calls(gm, _Q.int8_gemm) and not _calls(gm, _Q.quantize) and not _calls(gm, _Q.dequantize)
    assert not [n for n in gm.graph.nodes if n.target in (torch.round, torch.Tensor.round, torch.amax)]
    module, kernel, _, _ = result.details[0]
    assert "Triton per-token quantization" in kernel and "epilogue" in kernel
    out = run_with_cuda_impls(gm, inputs)
    torch.testing.assert_close(_logits(out), _logits(qdq_out), rtol=1e-4, atol=1e-4)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8a8_on_cuda_adds_the_bias_and_writes_the_activation_dtype_in_the_epilogue(dtype):
    model = _ThreeLinears().eval().to(dtype)  # linears with biases
    gm, inputs, qdq_out = _qdq(model, (torch.randn(3, 64).to(dtype),), "w8a8-dynamic")
    assert fuse.lower(gm, device=CUDA).counts == {"lowered": 3, "not_lowered": 0}
    linears = _calls(gm, _Q.int8_linear)
    assert len(linears) == 3 and all(n.args[6] is not None and n.args[7] == dtype for n in linears)
    out = run_with_cuda_impls(gm, inputs)
    assert out[0].dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, qdq_out, rtol=tol, atol=tol)


def test_dynamic_w8a8_cpu_lowering_is_unchanged():
    gm, inputs, qdq_out = _qdq(tiny_llama(), (torch.randint(0, 128, (2, 8)),), "w8a8-dynamic")  # 16 rows
    fuse.lower(gm)
    assert len(_calls(gm, _Q.int8_gemm)) == 14
    assert not _calls(gm, _Q.quantize_per_token) and not _calls(gm, _Q.int8_linear)


@needs_interpreter
def test_static_asymmetric_w8a8_on_cuda_precomputes_column_sums_once():
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 8))
    stats = qcompiler.calibrate(model, [ids], "w8a8-static", progress=False)
    gm, inputs, qdq_out = _qdq(model, (ids,), "w8a8-static", stats)
    w_q = {spec.module: gm.get_buffer(spec.w_q).clone() for spec in
           (n.meta["qcompiler.qlinear"] for n in gm.graph.nodes if "qcompiler.qlinear" in n.meta)}
    assert fuse.lower(gm, device=CUDA).counts == {"lowered": 14, "not_lowered": 0}
    linears = _calls(gm, _Q.int8_linear)
    assert len(linears) == 14 and not _calls(gm, _Q.quantize_per_token)
    for node in linears:
        colsum = node.args[5]
        assert colsum.op == "get_attr" and colsum.target.endswith("_w_colsum")
        assert isinstance(node.args[2], int) and node.args[2] != 0  # the calibrated zero point, a constant
        module = node.meta["qcompiler.lowered_from"].module
        assert torch.equal(gm.get_buffer(colsum.target), w_q[module].sum(1, dtype=torch.int32))
    out = run_with_cuda_impls(gm, inputs)
    torch.testing.assert_close(_logits(out), _logits(qdq_out), rtol=1e-4, atol=1e-4)


class _ThreeLinears(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(64, 48)  # group 32: the Triton kernel takes it
        self.fc2 = torch.nn.Linear(48, 48)  # group 16: too small a K tile
        self.fc3 = torch.nn.Linear(48, 16)  # per-channel, K=48: not a multiple of 32

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


_W4_MIXED = Recipe(
    name="w4-mixed", activation=None,
    weight=WeightScheme(bits=4, granularity="per_group", group_size=32, symmetric=False),
    overrides=(LayerOverride("fc2", weight=WeightScheme(bits=4, granularity="per_group", group_size=16, symmetric=False)),
               LayerOverride("fc3", weight=WeightScheme(bits=4, granularity="per_channel", symmetric=True))),
)


def test_triton_int4_reason_names_what_the_kernel_cannot_take():
    assert ops.triton_int4_reason(48, 64, 32) is None
    assert ops.triton_int4_reason(48, 4096, 4096) is None  # per-channel, K a multiple of 32
    assert "group size 16" in ops.triton_int4_reason(48, 48, 16)
    assert "per-channel K=48" in ops.triton_int4_reason(16, 48, 48)
    assert "odd" in ops.triton_int4_reason(16, 33, 33)


def test_int4_layers_the_triton_kernel_cannot_take_are_routed_to_the_reference_at_prepare_time():
    model = _ThreeLinears().eval()
    gm, inputs, qdq_out = _qdq(model, (torch.randn(2, 5, 64),), _W4_MIXED)
    specs = {n.meta["qcompiler.qlinear"].module: n.meta["qcompiler.qlinear"] for n in gm.graph.nodes
             if "qcompiler.qlinear" in n.meta}
    def layer(spec):
        n, k = gm.get_buffer(spec.w_q).shape
        return Layer(n, k, spec.group_size or k, None, CUDA)

    prepared = {m: int4._prepare_int4(gm, spec, layer(spec)) for m, spec in specs.items()}
    assert prepared["fc1"].constants["layout"] == "triton" and "Triton int4" in prepared["fc1"].kernel
    assert prepared["fc2"].constants["layout"] == "reference" and "group size 16" in prepared["fc2"].kernel
    assert prepared["fc3"].constants["layout"] == "reference" and "per-channel K=48" in prepared["fc3"].kernel

    gm, inputs, qdq_out = _qdq(model, (torch.randn(2, 5, 64),), _W4_MIXED)
    result = fuse.lower(gm, device=CUDA)
    assert result.counts == {"lowered": 3, "not_lowered": 0}
    kernels = {module: kernel for module, kernel, _, _ in result.details}
    assert kernels["fc1"].startswith("Triton int4")
    assert kernels["fc2"].startswith("int4 reference") and "group size 16" in kernels["fc2"]
    assert kernels["fc3"].startswith("int4 reference") and "per-channel K=48" in kernels["fc3"]
    assert len(_calls(gm, _Q.int4_gemm)) == 1 and len(_calls(gm, _Q.int4_gemm_reference)) == 2
    if interpreting():  # and the graph runs: the routed layers never reach the Triton kernel
        torch.testing.assert_close(run_with_cuda_impls(gm, inputs), qdq_out, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("recipe,why", [
    (Recipe(name="w8-only-asym", weight=WeightScheme(bits=8, symmetric=False), activation=None),
     "no kernel for W8 per_channel asym, A16/32"),
    (Recipe(name="w8a8-per-tensor-dynamic", activation=ActivationScheme(bits=8, granularity="per_tensor")),
     "no kernel for W8 per_channel sym, A8 dynamic_per_tensor"),
])
def test_schemes_without_a_kernel_keep_their_qdq_form_and_are_reported(recipe, why):
    model = _ThreeLinears().eval()
    x = torch.randn(2, 5, 64)
    gm, inputs = capture_graph(model, x)
    opts = BackendOptions.from_user({"recipe": recipe, "kernels": "fast"})
    rep = report.CompileReport(0, recipe.name, "fast")
    gm = pipeline.run(gm, pipeline.build(opts.recipe, torch.device("cpu"), stats=opts.stats, kernels=opts.kernels), rep)
    assert {p.name: p.counts for p in rep.passes}["lower"] == {"lowered": 0, "not_lowered": 3}
    assert rep.kernel_of == {m: ("reference quantize/dequantize ops", why) for m in ("fc1", "fc2", "fc3")}
    assert len(_calls(gm, _Q.dequantize)) >= 3  # the QDQ form is still there, and runs
    with torch.inference_mode():
        assert (gm(*inputs)[0] - model(x)).abs().max() < 0.05
