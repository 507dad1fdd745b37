// The online Hadamard transform of a rotated model's down projections (passes/rotate.py) for a few rows: one
// C++ call per layer where the graph otherwise makes two small GEMMs and the views around them (about 18 us of
// dispatch per layer in a decode step for ~0.1 M multiplies). Built with cpu_gemv.cpp
// (lowering/kernels/native.py); the online_hadamard lowering (lowering/hadamard.py) calls it.
//
// x @ kron(A, B) over the last dimension (n = m * p): each row viewed as X [m, p] becomes A^T (X B), the
// products in float32 with the loops over p innermost, p a template constant for the usual sizes (the sums of
// an output row stay in vector registers).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace {

// dst[i, :] = sum_l coef[i * ci + l * cl] * rows[l, :] for i < n_out, l < n_in, rows P wide: X B is
// (coef x, ci = P, cl = 1, rows B), A^T Y is (coef A, ci = 1, cl = m, rows Y). With P a compile-time constant
// (the Sylvester factors the rotation uses: 8 to 64) each output row's P sums stay in registers.
template <int P>
void mix_rows(const float* __restrict coef, int64_t ci, int64_t cl, int64_t n_out, int64_t n_in,
              const float* __restrict rows, float* __restrict dst) {
  for (int64_t i = 0; i < n_out; ++i) {
    float acc[P] = {};
    for (int64_t l = 0; l < n_in; ++l) {
      const float w = coef[i * ci + l * cl];
      for (int j = 0; j < P; ++j) acc[j] += w * rows[l * P + j];
    }
    for (int j = 0; j < P; ++j) dst[i * P + j] = acc[j];
  }
}

// The same for a width p known only at run time.
void mix_rows_any(const float* __restrict coef, int64_t ci, int64_t cl, int64_t n_out, int64_t n_in, int64_t p,
                  const float* __restrict rows, float* __restrict dst) {
  for (int64_t i = 0; i < n_out; ++i) {
    float* d = dst + i * p;
    for (int64_t j = 0; j < p; ++j) d[j] = 0.f;
    for (int64_t l = 0; l < n_in; ++l) {
      const float w = coef[i * ci + l * cl];
      for (int64_t j = 0; j < p; ++j) d[j] += w * rows[l * p + j];
    }
  }
}

// One row X [m, p]: Y = X B, then out = A^T Y (no A: out = Y).
template <int P>
void row_fixed(const float* x, const float* a, const float* b, int64_t m, float* y, float* out) {
  mix_rows<P>(x, P, 1, m, P, b, a == nullptr ? out : y);
  if (a != nullptr) mix_rows<P>(a, 1, m, m, m, y, out);
}

void row_any(const float* x, const float* a, const float* b, int64_t m, int64_t p, float* y, float* out) {
  mix_rows_any(x, p, 1, m, p, p, b, a == nullptr ? out : y);
  if (a != nullptr) mix_rows_any(a, 1, m, m, m, p, y, out);
}

}  // namespace

at::Tensor kron_hadamard(const at::Tensor& x, const std::optional<at::Tensor>& a, const at::Tensor& b) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "kron_hadamard takes float32 activations, got ", x.scalar_type());
  TORCH_CHECK(b.scalar_type() == at::kFloat && b.dim() == 2 && b.size(0) == b.size(1),
              "kron_hadamard: B must be a square float32 matrix");
  TORCH_CHECK(x.dim() >= 1, "kron_hadamard: x must have at least one dimension");
  if (a.has_value()) {
    TORCH_CHECK(a->scalar_type() == at::kFloat && a->dim() == 2 && a->size(0) == a->size(1),
                "kron_hadamard: A must be a square float32 matrix");
  }
  const int64_t p = b.size(0);
  const int64_t m = a.has_value() ? a->size(0) : 1;
  const int64_t n = m * p;
  TORCH_CHECK(x.size(-1) == n, "kron_hadamard: x has ", x.size(-1), " channels, kron(A, B) is ", n, " wide");
  const auto x2 = x.reshape({-1, n}).contiguous();
  const auto bc = b.contiguous();
  const auto ac = a.has_value() ? a->contiguous() : at::Tensor();
  const int64_t rows = x2.size(0);
  auto out = at::empty({rows, n}, x.options());
  const float* xp = x2.data_ptr<float>();
  const float* bp = bc.data_ptr<float>();
  const float* ap = a.has_value() ? ac.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> y(static_cast<size_t>(n));
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = xp + r * n;
      float* o = op + r * n;
      switch (p) {
        case 8: row_fixed<8>(xr, ap, bp, m, y.data(), o); break;
        case 16: row_fixed<16>(xr, ap, bp, m, y.data(), o); break;
        case 32: row_fixed<32>(xr, ap, bp, m, y.data(), o); break;
        case 64: row_fixed<64>(xr, ap, bp, m, y.data(), o); break;
        default: row_any(xr, ap, bp, m, p, y.data(), o);
      }
    }
  });
  return out.reshape(x.sizes());
}

TORCH_LIBRARY_FRAGMENT(qcompiler, m) {
  m.def("kron_hadamard(Tensor x, Tensor? a, Tensor b) -> Tensor");
}

TORCH_LIBRARY_IMPL(qcompiler, CPU, m) {
  m.impl("kron_hadamard", &kron_hadamard);
}
