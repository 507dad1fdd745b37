// Matrix-vector kernels for the decode step on x86 CPUs: a few rows of activations against a weight
// that is read once from memory, so the time is the weight's bytes over the memory bandwidth. Built at
// first use with -O3 -march=native (lowering/kernels/native.py): the compiler turns the inner loops
// into the machine's widest integer dot products (vpdpbusd on AVX512-VNNI, vpmaddwd on AVX2).
//
// All three take activations [M, K] (M small) and a weight [N, K] stored row by row, and split the
// output channels over torch's threads (at::parallel_for; the build has OpenMP) when the weight is large
// enough to pay for waking them; every output element is one dot product in one thread, reading its
// weight row front to back (one sequential stream per thread: a variant that read four rows at a time
// with explicit VNNI intrinsics reached half the bandwidth of these loops on a Zen 4).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

// Output channels per task: at least kGrain, and at least kMinBytes of weight, so that a small weight
// (SmolLM2's 192 x 576 key/value projections) stays on one thread, where waking a second costs more
// than it saves.
constexpr int64_t kGrain = 32;
constexpr int64_t kMinBytes = 1 << 17;

// `row_bytes`: bytes of one weight row (K for int8, K / 2 for packed int4)
inline int64_t grain(int64_t row_bytes) {
  return std::max<int64_t>(kGrain, kMinBytes / std::max<int64_t>(row_bytes, 1));
}

inline int32_t dot_u8s8(const uint8_t* __restrict a, const int8_t* __restrict b, int64_t n) {
  int32_t acc = 0;
  for (int64_t i = 0; i < n; ++i) acc += static_cast<int32_t>(a[i]) * static_cast<int32_t>(b[i]);
  return acc;
}

inline int32_t dot_s16s8(const int16_t* __restrict a, const int8_t* __restrict b, int64_t n) {
  int32_t acc = 0;
  for (int64_t i = 0; i < n; ++i) acc += static_cast<int32_t>(a[i]) * static_cast<int32_t>(b[i]);
  return acc;
}

// Float sums are reassociated into vector lanes (omp simd): within float32 rounding of the reference.
// sum_j a_lo[j] * (b[j] & 15) + a_hi[j] * (b[j] >> 4) over one group's bytes
inline float dot_f32u4(const float* __restrict a_lo, const float* __restrict a_hi, const uint8_t* __restrict b,
                       int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < n; ++j) {
    acc += a_lo[j] * static_cast<float>(b[j] & 15) + a_hi[j] * static_cast<float>(b[j] >> 4);
  }
  return acc;
}

std::vector<int64_t> out_sizes(const at::Tensor& x, int64_t n) {
  auto sizes = x.sizes().vec();
  sizes.back() = n;
  return sizes;
}

}  // namespace

// ((x_q - x_zero_point) @ w_q.T) * w_scale, float32 out: uint8 activations with their zero point, int8
// weights, exact int32 accumulation. w_rowsum[n] = sum_k w_q[n, k] takes the zero point back out.
at::Tensor int8_gemv(const at::Tensor& x_q, int64_t x_zero_point, const at::Tensor& w_q, const at::Tensor& w_rowsum,
                     const at::Tensor& w_scale) {
  TORCH_CHECK(x_q.scalar_type() == at::kByte, "int8_gemv takes uint8 activations, got ", x_q.scalar_type());
  TORCH_CHECK(w_q.scalar_type() == at::kChar && w_q.dim() == 2 && w_q.is_contiguous(),
              "int8_gemv takes a contiguous int8 weight [N, K]");
  const int64_t n = w_q.size(0), k = w_q.size(1);
  TORCH_CHECK(x_q.size(-1) == k, "int8_gemv: x has K=", x_q.size(-1), ", the weight ", k);
  TORCH_CHECK(w_rowsum.scalar_type() == at::kInt && w_rowsum.numel() == n, "int8_gemv: w_rowsum must be int32 [N]");
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.numel() == n, "int8_gemv: w_scale must be float32 [N]");
  const auto x2 = x_q.reshape({-1, k}).contiguous();
  const int64_t m = x2.size(0);
  auto out = at::empty({m, n}, x_q.options().dtype(at::kFloat));
  const uint8_t* xp = x2.data_ptr<uint8_t>();
  const int8_t* wp = w_q.data_ptr<int8_t>();
  const int32_t* rs = w_rowsum.contiguous().data_ptr<int32_t>();
  const float* sp = w_scale.contiguous().data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int32_t zp = static_cast<int32_t>(x_zero_point);
  at::parallel_for(0, n, grain(k), [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      for (int64_t i = 0; i < m; ++i) {
        const int32_t acc = dot_u8s8(xp + i * k, wp + j * k, k) - zp * rs[j];
        op[i * n + j] = static_cast<float>(acc) * sp[j];
      }
    }
  });
  return out.reshape(out_sizes(x_q, n));
}

// (x @ w_q.T) * w_scale for float32 activations and int8 weights (weight-only int8), float32 out. Each
// row of x is rounded to fixed point with the most levels an exact int32 sum allows (qmax = (2^31-1) /
// (127 K), at most 32767: 15 bits for K = 576), so the dot products run on the CPU's int16 x int8 units
// (vpdpwssd); the rounding error is below 0.5 / qmax of the row's largest value.
at::Tensor int8_weight_gemv(const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& w_scale) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "int8_weight_gemv takes float32 activations, got ", x.scalar_type());
  TORCH_CHECK(w_q.scalar_type() == at::kChar && w_q.dim() == 2 && w_q.is_contiguous(),
              "int8_weight_gemv takes a contiguous int8 weight [N, K]");
  const int64_t n = w_q.size(0), k = w_q.size(1);
  TORCH_CHECK(x.size(-1) == k && w_scale.numel() == n && w_scale.scalar_type() == at::kFloat,
              "int8_weight_gemv: shapes do not match");
  const auto x2 = x.reshape({-1, k}).contiguous();
  const int64_t m = x2.size(0);
  const float qmax = static_cast<float>(std::min<int64_t>(32767, 2147483647LL / (127 * std::max<int64_t>(k, 1))));
  std::vector<int16_t> xq(m * k);
  std::vector<float> xs(m);
  const float* xp = x2.data_ptr<float>();
  for (int64_t i = 0; i < m; ++i) {
    float absmax = 0.f;
    for (int64_t c = 0; c < k; ++c) absmax = std::max(absmax, std::fabs(xp[i * k + c]));
    xs[i] = absmax > 0.f ? absmax / qmax : 1.f;
    for (int64_t c = 0; c < k; ++c) xq[i * k + c] = static_cast<int16_t>(std::nearbyint(xp[i * k + c] / xs[i]));
  }
  auto out = at::empty({m, n}, x.options());
  const int8_t* wp = w_q.data_ptr<int8_t>();
  const float* sp = w_scale.contiguous().data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, n, grain(k), [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      for (int64_t i = 0; i < m; ++i) {
        op[i * n + j] = static_cast<float>(dot_s16s8(xq.data() + i * k, wp + j * k, k)) * (sp[j] * xs[i]);
      }
    }
  });
  return out.reshape(out_sizes(x, n));
}

// x @ W.T with W = (q - zero) * scale per group of `group` input channels, float32 activations; q packed
// two per byte as lowering/kernels/reference.pack_int4 does (byte j: q[2j] low nibble, q[2j+1] high).
// Per group: scale * (sum_k x[k] q[k] - zero * sum_k x[k]).
at::Tensor int4_gemv(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& scale, const at::Tensor& zero,
                     int64_t group) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "int4_gemv takes float32 activations, got ", x.scalar_type());
  TORCH_CHECK(w_packed.scalar_type() == at::kByte && w_packed.dim() == 2 && w_packed.is_contiguous(),
              "int4_gemv takes a contiguous uint8 packed weight [N, K / 2]");
  const int64_t n = w_packed.size(0), k = 2 * w_packed.size(1);
  TORCH_CHECK(x.size(-1) == k, "int4_gemv: x has K=", x.size(-1), ", the packed weight ", k);
  TORCH_CHECK(group >= 2 && group % 2 == 0 && k % group == 0, "int4_gemv: group ", group, " does not fit K=", k);
  const int64_t groups = k / group, half = group / 2;
  TORCH_CHECK(scale.numel() == n * groups && zero.numel() == n * groups, "int4_gemv: scale/zero must be [N, K/group]");
  const auto x2 = x.reshape({-1, k}).contiguous();
  const int64_t m = x2.size(0);
  // de-interleave each row into even and odd columns (so both loops read memory in order) and sum its groups
  auto even = at::empty({m, k / 2}, x.options()), odd = at::empty({m, k / 2}, x.options());
  auto gsum = at::empty({m, groups}, x.options());
  const float* xp = x2.data_ptr<float>();
  float *ep = even.data_ptr<float>(), *dp = odd.data_ptr<float>(), *gp = gsum.data_ptr<float>();
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < k / 2; ++j) {
      ep[i * (k / 2) + j] = xp[i * k + 2 * j];
      dp[i * (k / 2) + j] = xp[i * k + 2 * j + 1];
    }
    for (int64_t g = 0; g < groups; ++g) {
      float s = 0.f;
      for (int64_t c = g * group; c < (g + 1) * group; ++c) s += xp[i * k + c];
      gp[i * groups + g] = s;
    }
  }
  auto out = at::empty({m, n}, x.options());
  const uint8_t* wp = w_packed.data_ptr<uint8_t>();
  const float* sp = scale.contiguous().data_ptr<float>();
  const float* zp = zero.contiguous().data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, n, grain(k / 2), [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      for (int64_t i = 0; i < m; ++i) {
        float acc = 0.f;
        for (int64_t g = 0; g < groups; ++g) {
          const float dot = dot_f32u4(ep + i * (k / 2) + g * half, dp + i * (k / 2) + g * half,
                                      wp + j * (k / 2) + g * half, half);
          acc += sp[j * groups + g] * (dot - zp[j * groups + g] * gp[i * groups + g]);
        }
        op[i * n + j] = acc;
      }
    }
  });
  return out.reshape(out_sizes(x, n));
}

// How many threads the kernels' at::parallel_for runs on for `tasks` tasks of one item each: a check that
// the build has OpenMP (without it parallel_for is a plain loop on the calling thread).
int64_t gemv_threads(int64_t tasks) {
  std::vector<int> used(static_cast<size_t>(std::max<int64_t>(tasks, 1)), -1);
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) used[t] = at::get_thread_num();
  });
  std::sort(used.begin(), used.end());
  return std::unique(used.begin(), used.end()) - used.begin();
}

TORCH_LIBRARY_FRAGMENT(qcompiler, m) {
  m.def("int8_gemv(Tensor x_q, int x_zero_point, Tensor w_q, Tensor w_rowsum, Tensor w_scale) -> Tensor");
  m.def("int8_weight_gemv(Tensor x, Tensor w_q, Tensor w_scale) -> Tensor");
  m.def("int4_gemv(Tensor x, Tensor w_packed, Tensor scale, Tensor zero, int group_size) -> Tensor");
  m.def("gemv_threads(int tasks) -> int", &gemv_threads);
}

TORCH_LIBRARY_IMPL(qcompiler, CPU, m) {
  m.impl("int8_gemv", &int8_gemv);
  m.impl("int8_weight_gemv", &int8_weight_gemv);
  m.impl("int4_gemv", &int4_gemv);
}
