// Attention of one query position over a preallocated (static) KV cache, for the decode step on CPUs.
//
// A static cache holds `L` positions (the longest prompt plus new tokens), of which a decode step at
// depth `d` has filled `d + 1`; the attention mask lets through only those. PyTorch's attention reads
// all `L` positions of every layer's keys and values and throws the masked ones away (at depth 128 of a
// 514-position cache, three quarters of the work). This kernel reads the mask first and stops at its last
// allowed position, so a step reads the filled part of the cache only. Built with cpu_gemv.cpp
// (lowering/kernels/native.py); the decode_attention lowering (lowering/attention.py) calls it.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

namespace {

inline float dot_f32(const float* __restrict a, const float* __restrict b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

// exp(x) for the softmax's x = score - max <= 0, in a form the compiler vectorizes (the C library's expf
// is a scalar call per position): x = n ln2 + r with |r| <= ln2 / 2 (ln 2 split in two constants, as in
// Cody and Waite), exp(r) by Cephes' degree-6 polynomial (within 2 ulp of expf), 2^n from the exponent
// bits. Below -87.3 (where expf leaves the normal range) the result is exp(-87.3), about 1e-38, which
// next to the largest term (exactly 1) changes no float32 sum.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.3f);
  const float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest: 1.5 * 2^23
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return p * two_n;
}

// scores sc[0, n) (masked ones -inf, best their largest, finite) -> exp(score - best) in place; returns their sum
inline float softmax_weights(float* __restrict sc, int64_t n, float best) {
  constexpr float kMasked = -std::numeric_limits<float>::infinity();
  float total = 0.f;
#pragma omp simd reduction(+ : total)
  for (int64_t j = 0; j < n; ++j) {
    const float e = sc[j] == kMasked ? 0.f : exp_nonpositive(sc[j] - best);
    sc[j] = e;
    total += e;
  }
  return total;
}

inline void axpy_f32(float alpha, const float* __restrict x, float* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

#if defined(__AVX512F__)
// One query head's scores and weighted values for a head dimension of 16 * V floats (64, 128) on AVX-512:
// the query and the output row stay in registers, each key's dot product is a tree of two accumulators
// (short dependency chains, so consecutive positions overlap), and the softmax runs as in the generic loop.
template <int V>
void head_avx512(const float* __restrict qrow, const float* __restrict kbase, int64_t kl, const float* __restrict vbase,
                 int64_t vl, const bool* row, int64_t ml, int64_t n, float fscale, float* __restrict sc, float* orow) {
  constexpr float kMasked = -std::numeric_limits<float>::infinity();
  __m512 qv[V];
  for (int t = 0; t < V; ++t) qv[t] = _mm512_loadu_ps(qrow + 16 * t);
  float best = kMasked;
  for (int64_t j = 0; j < n; ++j) {
    if (row && !row[j * ml]) {
      sc[j] = kMasked;
      continue;
    }
    const float* kr = kbase + j * kl;
    __m512 a0 = _mm512_mul_ps(qv[0], _mm512_loadu_ps(kr)), a1 = _mm512_mul_ps(qv[1], _mm512_loadu_ps(kr + 16));
    for (int t = 2; t < V; t += 2) {
      a0 = _mm512_fmadd_ps(qv[t], _mm512_loadu_ps(kr + 16 * t), a0);
      a1 = _mm512_fmadd_ps(qv[t + 1], _mm512_loadu_ps(kr + 16 * t + 16), a1);
    }
    sc[j] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) * fscale;
    best = std::max(best, sc[j]);
  }
  __m512 ov[V];
  for (int t = 0; t < V; ++t) ov[t] = _mm512_setzero_ps();
  if (best != kMasked) {
    const float total = softmax_weights(sc, n, best);
    for (int64_t j = 0; j < n; ++j) {
      if (sc[j] == 0.f) continue;
      const __m512 w = _mm512_set1_ps(sc[j]);
      const float* vr = vbase + j * vl;
      for (int t = 0; t < V; ++t) ov[t] = _mm512_fmadd_ps(w, _mm512_loadu_ps(vr + 16 * t), ov[t]);
    }
    const __m512 inv = _mm512_set1_ps(1.f / total);
    for (int t = 0; t < V; ++t) ov[t] = _mm512_mul_ps(ov[t], inv);
  }
  for (int t = 0; t < V; ++t) _mm512_storeu_ps(orow + 16 * t, ov[t]);
}
#endif

}  // namespace

// softmax(q k^T * scale, masked) v for q [B, H, 1, D] and k, v [B, KV, L, D] (query head h reads key/value
// head h / (H / KV): grouped-query attention without repeating the cache), float32; `mask` a bool tensor
// that broadcasts to [B, H, 1, L] (true: attend) or none. Positions after the last one the mask lets
// through are not read. A row the mask lets nothing through gives zeros (as PyTorch's CPU attention does).
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& mask, double scale) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "decode_attention takes float32 query, keys and values");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "decode_attention takes 4-D [batch, heads, length, dim]");
  TORCH_CHECK(q.size(2) == 1, "decode_attention takes one query position, got ", q.size(2));
  TORCH_CHECK(k.sizes() == v.sizes(), "decode_attention: keys ", k.sizes(), " and values ", v.sizes(), " differ");
  const int64_t b = q.size(0), h = q.size(1), d = q.size(3), kv = k.size(1), len = k.size(2);
  TORCH_CHECK(k.size(0) == b && k.size(3) == d, "decode_attention: keys ", k.sizes(), " do not match the query ",
              q.sizes());
  TORCH_CHECK(kv > 0 && h % kv == 0, "decode_attention: ", h, " query heads are not a multiple of ", kv,
              " key/value heads");
  at::Tensor m;
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool, "decode_attention takes a bool mask, got ", mask->scalar_type());
    m = mask->expand({b, h, 1, len});  // a view: broadcast dimensions read with stride 0
  }
  const auto qc = q.contiguous();
  const auto kc = k.stride(3) == 1 ? k : k.contiguous();
  const auto vc = v.stride(3) == 1 ? v : v.contiguous();
  auto out = at::empty({b, h, 1, d}, q.options());
  const float* qp = qc.data_ptr<float>();
  const float* kp = kc.data_ptr<float>();
  const float* vp = vc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const bool* mp = m.defined() ? m.data_ptr<bool>() : nullptr;
  const int64_t mb = m.defined() ? m.stride(0) : 0, mh = m.defined() ? m.stride(1) : 0;
  const int64_t ml = m.defined() ? m.stride(3) : 0;
  const int64_t group = h / kv;
  const float fscale = static_cast<float>(scale);
  const int64_t kb = kc.stride(0), kh = kc.stride(1), kl = kc.stride(2);
  const int64_t vb = vc.stride(0), vh = vc.stride(1), vl = vc.stride(2);
  constexpr float kMasked = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, b * h, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> score(static_cast<size_t>(len));
    float* sc = score.data();
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t bi = bh / h, hi = bh % h, kvi = hi / group;
      const bool* row = mp ? mp + bi * mb + hi * mh : nullptr;
      int64_t n = len;
      if (row) {
        while (n > 0 && !row[(n - 1) * ml]) --n;  // the last position the mask lets through
      }
      const float* qrow = qp + bh * d;
      const float* kbase = kp + bi * kb + kvi * kh;
      const float* vbase = vp + bi * vb + kvi * vh;
      float* orow = op + bh * d;
#if defined(__AVX512F__)
      if (d == 64 || d == 128) {
        (d == 64 ? head_avx512<4> : head_avx512<8>)(qrow, kbase, kl, vbase, vl, row, ml, n, fscale, sc, orow);
        continue;
      }
#endif
      float best = kMasked;
      for (int64_t j = 0; j < n; ++j) {
        sc[j] = (row && !row[j * ml]) ? kMasked : dot_f32(qrow, kbase + j * kl, d) * fscale;
        best = std::max(best, sc[j]);
      }
      for (int64_t i = 0; i < d; ++i) orow[i] = 0.f;
      if (best == kMasked) continue;  // nothing to attend to: zeros
      const float total = softmax_weights(sc, n, best);
      for (int64_t j = 0; j < n; ++j) {
        if (sc[j] != 0.f) axpy_f32(sc[j], vbase + j * vl, orow, d);
      }
      const float inv = 1.f / total;
      for (int64_t i = 0; i < d; ++i) orow[i] *= inv;
    }
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(qcompiler, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(qcompiler, CPU, m) {
  m.impl("decode_attention", &decode_attention);
}
