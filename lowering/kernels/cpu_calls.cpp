// Direct Python entry points to the decode kernels, for the wrapper code Inductor generates.
//
// A compiled graph calls a custom op as torch.ops.qcompiler.<op>.default(...): PyTorch's dispatcher
// parses every argument against the schema into a boxed stack, dispatches on the keys and unboxes it again
// for the kernel, about 2.5 us a call on a 2-core Xeon. A decode step of SmolLM2 makes about 150 such
// calls. These functions take the same arguments in the same order (METH_FASTCALL: no tuple, no keyword
// parsing), check their count and types, and call the same C++ functions that the ops register, so the
// results are the same bit for bit. lowering/kernels/direct_calls.py makes Inductor's wrapper call them.
// Each records itself under the op's name when torch.profiler is on (as the dispatcher does for the op, though
// without the inputs' shapes; a flag test when it is off), so profiles name the same ops either way. Unlike the
// dispatcher, they keep the GIL while the kernel runs (as Inductor's own generated kernels do).

#include <ATen/record_function.h>
#include <torch/extension.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <optional>

#include "cpu_argmax.h"

at::Tensor int8_gemv(const at::Tensor& x_q, int64_t x_zero_point, const at::Tensor& w_q, const at::Tensor& w_rowsum,
                     const at::Tensor& w_scale);
at::Tensor int8_weight_gemv(const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& w_scale);
at::Tensor int4_gemv(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& scale, const at::Tensor& zero,
                     int64_t group);
at::Tensor int4_gemv_tiled(const at::Tensor& x, const at::Tensor& w_tiled, const at::Tensor& scale,
                           const at::Tensor& zero, int64_t group);
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& mask, double scale);
at::Tensor kron_hadamard(const at::Tensor& x, const std::optional<at::Tensor>& a, const at::Tensor& b);

namespace {

// The arguments of one call, checked as they are read; a wrong one raises TypeError naming the function.
struct Args {
  const char* name;
  PyObject* const* args;

  void count(Py_ssize_t given, Py_ssize_t expected) const {
    if (given != expected) {
      throw torch::TypeError(c10::str(name, "() takes ", expected, " arguments (", given, " given)"));
    }
  }
  const at::Tensor& tensor(int i) const {
    if (!THPVariable_Check(args[i])) {
      throw torch::TypeError(c10::str(name, "(): argument ", i, " must be a Tensor, not ", Py_TYPE(args[i])->tp_name));
    }
    const at::Tensor& t = THPVariable_Unpack(args[i]);
    // (the dispatcher would refuse another device's tensor for a CPU-only op; the kernels read data_ptr)
    TORCH_CHECK(t.device().is_cpu(), name, "(): argument ", i, " must be a CPU tensor, got one on ", t.device());
    return t;
  }
  std::optional<at::Tensor> optional_tensor(int i) const {
    if (args[i] == Py_None) return std::nullopt;
    return tensor(i);
  }
  int64_t integer(int i) const {
    if (!PyLong_Check(args[i])) {
      throw torch::TypeError(c10::str(name, "(): argument ", i, " must be an int, not ", Py_TYPE(args[i])->tp_name));
    }
    const long long value = PyLong_AsLongLong(args[i]);
    if (value == -1 && PyErr_Occurred()) throw python_error();
    return value;
  }
  double real(int i) const {
    if (!PyFloat_Check(args[i]) && !PyLong_Check(args[i])) {
      throw torch::TypeError(c10::str(name, "(): argument ", i, " must be a float, not ", Py_TYPE(args[i])->tp_name));
    }
    const double value = PyFloat_AsDouble(args[i]);
    if (value == -1.0 && PyErr_Occurred()) throw python_error();
    return value;
  }
};

// call_<op>: the entry point of op, taking `arity` arguments and passing them on as the expression list says.
#define QC_ENTRY(op, arity, ...)                                                 \
  PyObject* call_##op(PyObject*, PyObject* const* args, Py_ssize_t n) {          \
    HANDLE_TH_ERRORS                                                             \
    RECORD_FUNCTION("qcompiler::" #op, c10::ArrayRef<const c10::IValue>{});     \
    const Args a{#op, args};                                                     \
    a.count(n, arity);                                                           \
    return THPVariable_Wrap(op(__VA_ARGS__));                                    \
    END_HANDLE_TH_ERRORS                                                         \
  }

QC_ENTRY(int8_gemv, 5, a.tensor(0), a.integer(1), a.tensor(2), a.tensor(3), a.tensor(4))
QC_ENTRY(int8_weight_gemv, 3, a.tensor(0), a.tensor(1), a.tensor(2))
QC_ENTRY(int4_gemv, 5, a.tensor(0), a.tensor(1), a.tensor(2), a.tensor(3), a.integer(4))
QC_ENTRY(int4_gemv_tiled, 5, a.tensor(0), a.tensor(1), a.tensor(2), a.tensor(3), a.integer(4))
QC_ENTRY(decode_attention, 5, a.tensor(0), a.tensor(1), a.tensor(2), a.optional_tensor(3), a.real(4))
QC_ENTRY(kron_hadamard, 3, a.tensor(0), a.optional_tensor(1), a.tensor(2))

PyObject* call_greedy_tokens(PyObject*, PyObject* const* args, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  RECORD_FUNCTION("qcompiler::greedy_tokens", c10::ArrayRef<const c10::IValue>{});
  const Args a{"greedy_tokens", args};
  a.count(n, 1);
  const at::Tensor& x = a.tensor(0);
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(1) > 0 &&
                  x.stride(1) == 1, "greedy_tokens takes float32 CPU logits [rows, n > 0] with rows contiguous, got ",
              x.scalar_type(), " ", x.sizes(), " strides ", x.strides());
  at::Tensor out = at::empty({x.size(0)}, x.options().dtype(at::kLong));
  const float* base = x.data_ptr<float>();
  int64_t* o = out.data_ptr<int64_t>();
  {
    pybind11::gil_scoped_release no_gil;
    for (int64_t r = 0; r < x.size(0); ++r) o[r] = row_argmax(base + r * x.stride(0), x.size(1));
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

#define QC_FASTCALL(f) reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(f)), METH_FASTCALL

PyMethodDef methods[] = {
    {"int8_gemv", QC_FASTCALL(call_int8_gemv), "int8_gemv(x_q, x_zero_point, w_q, w_rowsum, w_scale)"},
    {"int8_weight_gemv", QC_FASTCALL(call_int8_weight_gemv), "int8_weight_gemv(x, w_q, w_scale)"},
    {"int4_gemv", QC_FASTCALL(call_int4_gemv), "int4_gemv(x, w_packed, scale, zero, group_size)"},
    {"int4_gemv_tiled", QC_FASTCALL(call_int4_gemv_tiled), "int4_gemv_tiled(x, w_tiled, scale, zero, group_size)"},
    {"decode_attention", QC_FASTCALL(call_decode_attention), "decode_attention(q, k, v, mask, scale)"},
    {"kron_hadamard", QC_FASTCALL(call_kron_hadamard), "kron_hadamard(x, a, b)"},
    {"greedy_tokens", QC_FASTCALL(call_greedy_tokens), "greedy_tokens(logits): torch.argmax(logits, -1)"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  if (PyModule_AddFunctions(m.ptr(), methods) != 0) throw pybind11::error_already_set();
}
