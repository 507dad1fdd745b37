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

#include <algorithm>
#include <cmath>
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

inline void axpy_f32(float alpha, const float* __restrict x, float* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

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
      float best = kMasked;
      for (int64_t j = 0; j < n; ++j) {
        sc[j] = (row && !row[j * ml]) ? kMasked : dot_f32(qrow, kbase + j * kl, d) * fscale;
        best = std::max(best, sc[j]);
      }
      for (int64_t i = 0; i < d; ++i) orow[i] = 0.f;
      if (best == kMasked) continue;  // nothing to attend to: zeros
      float total = 0.f;
#pragma omp simd reduction(+ : total)
      for (int64_t j = 0; j < n; ++j) {
        sc[j] = std::exp(sc[j] - best);  // exp(-inf) = 0 for the masked positions
        total += sc[j];
      }
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
