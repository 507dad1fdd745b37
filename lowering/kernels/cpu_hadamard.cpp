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

// One row: Y = X B (X [m, P]), then out = A^T Y (A [m, m]; none: out = Y). With P a compile-time constant
// (the Sylvester factors the rotation uses: 8 to 64) each output row's P sums stay in registers.
template <int P>
void row_fixed(const float* __restrict x, const float* __restrict a, const float* __restrict b, int64_t m,
               float* __restrict y, float* __restrict out) {
  float* dst = a == nullptr ? out : y;
  for (int64_t i = 0; i < m; ++i) {
    float acc[P] = {};
    for (int l = 0; l < P; ++l) {
      const float v = x[i * P + l];
      for (int j = 0; j < P; ++j) acc[j] += v * b[l * P + j];
    }
    for (int j = 0; j < P; ++j) dst[i * P + j] = acc[j];
  }
  if (a == nullptr) return;
  for (int64_t i = 0; i < m; ++i) {
    float acc[P] = {};
    for (int64_t k = 0; k < m; ++k) {
      const float w = a[k * m + i];
      for (int j = 0; j < P; ++j) acc[j] += w * y[k * P + j];
    }
    for (int j = 0; j < P; ++j) out[i * P + j] = acc[j];
  }
}

void row_any(const float* __restrict x, const float* __restrict a, const float* __restrict b, int64_t m, int64_t p,
             float* __restrict y, float* __restrict out) {
  float* dst = a == nullptr ? out : y;
  for (int64_t i = 0; i < m * p; ++i) dst[i] = 0.f;
  for (int64_t i = 0; i < m; ++i)
    for (int64_t l = 0; l < p; ++l)
      for (int64_t j = 0; j < p; ++j) dst[i * p + j] += x[i * p + l] * b[l * p + j];
  if (a == nullptr) return;
  for (int64_t i = 0; i < m * p; ++i) out[i] = 0.f;
  for (int64_t i = 0; i < m; ++i)
    for (int64_t k = 0; k < m; ++k)
      for (int64_t j = 0; j < p; ++j) out[i * p + j] += a[k * m + i] * y[k * p + j];
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
