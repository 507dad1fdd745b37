// Matrix-vector kernels for the decode step on x86 CPUs: a few rows of activations against a weight
// that is read once from memory, so the time is the weight's bytes over the memory bandwidth. Built at
// first use with -O3 -march=native (lowering/kernels/native.py): AVX-512 builds run intrinsics (vpdpbusd,
// vpdpwssd), other builds the compiler's loops as it vectorizes them for the machine (vpdpbusd on
// AVX-VNNI, vpmaddwd on AVX2; int8_gemv's activations are widened to int16 first on CPUs without VNNI, and
// AVX2 builds run intrinsics there).
//
// They take activations [M, K] (M small) and a weight [N, K] stored row by row (int4_gemv_tiled: in tiles
// of 32 rows), and split the output channels over torch's threads (at::parallel_for; the build has OpenMP)
// when the weight is large enough to pay for waking them; every output element is one dot product in one
// thread. A thread reads its rows (or tiles) in 4 runs, each from another quarter of its share of the
// weight, one row of each in turn: 4 sequential streams, which the L2 streamer fetches at once, where one
// stream a thread leaves the memory bus idle while its own misses are outstanding (kRowStreams, kStreams
// below); with AVX-512 (int8_gemv: AVX512-VNNI) the 4 rows' dot products run interleaved, one row of
// activations loaded for all 4 (the tiled int4 kernel: AVX-512 only; its AVX2 build reads one tile at a time).
// (Four adjacent rows at a time, one stream, reached half the bandwidth of one row at a time on a Zen 4.)
#include <torch/extension.h>
#include <ATen/Parallel.h>
#if defined(__AVX512BW__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
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

// How far ahead of its reads a row-by-row GEMV (int8_gemv with VNNI, int8_weight_gemv) asks for its weight's
// bytes, into L2: 8 KB, 0.86x the time of the hardware prefetcher alone over SmolLM2's 120 int8 decode GEMVs on
// an Ice Lake Xeon (1 KB 0.91x, 4 KB 0.87x, 16 KB 0.89x; into L1 0.88-0.91x), measured with one stream a
// thread; with 4 (rows_in_streams) 2, 4 and 8 KB measured the same within the host's noise, into L1 too. Each
// row asks for the lines of the row that far on, within its run of rows (`left`: the run's bytes from `row` on).
constexpr int64_t kRowAhead = 8192;
inline void prefetch_row(const int8_t* row, int64_t k, int64_t left) {
#if defined(__AVX2__) || defined(__AVX512F__)
  const int64_t stop = std::min<int64_t>(kRowAhead + k, left);
  for (int64_t b = kRowAhead; b < stop; b += 64) _mm_prefetch(reinterpret_cast<const char*>(row + b), _MM_HINT_T1);
#endif
}

// How many weight rows a row-by-row GEMV's thread reads side by side, each from another part of its share of the
// weight: as many sequential streams, which the L2 streamer fetches ahead at once. On an Ice Lake Xeon
// (examples/bench_gemv_revisions.py, 2 threads, one process against the build before): SmolLM2's 120 int8 decode
// GEMVs 0.84-0.89x the time with 4 streams a thread (2 streams 0.89x, 8 streams 0.90x), its int8 LM head 0.91x;
// with dots_s16s8 besides, the LM head 0.75-0.81x. Where those interleaved dot products are not built (no
// AVX-512; int8_gemv without AVX512-VNNI) the rows are visited in the same order one at a time, as the first of
// those measurements did (not measured on an AVX2 CPU).
constexpr int kRowStreams = 4;

// The length of the runs that `count` items of `bytes` each are read in, `streams` runs side by side: count /
// streams, shortened (by up to 15 items, read after the runs) while two runs' starts lie within
// 256 bytes of each other modulo 4 KB. Streams at one offset within their pages slowed a thread's reads: 4
// streams of int8 rows 54 pages apart (SmolLM2's gate/up projections) took 1.65x the time of 4 at other offsets
// on an Ice Lake Xeon with the weight in its caches (int8_gemv), 1.1x streaming from memory (the LM head).
inline int64_t run_length(int64_t count, int64_t bytes, int streams) {
  const int64_t longest = count / streams;
  auto close = [](int64_t d) { return d % 4096 < 256 || d % 4096 > 4096 - 256; };
  for (int64_t part = longest; part > 1 && part > longest - 16; --part) {
    bool apart = true;
    for (int u = 1; u < streams; ++u) apart = apart && !close(u * part * bytes);
    if (apart) return part;
  }
  return longest;
}

// A row-by-row GEMV thread's rows [begin, end) of the weight `w` ([N, k] int8), in the order it reads them:
// kRowStreams runs of equal length, one row of each at a time (visit(js, rows, kRowStreams): their indices and
// their bytes), then the rows left over one at a time (visit(js, rows, 1)). Each row asks for its run's bytes
// kRowAhead on (prefetch_row) before it is visited.
template <typename F>
inline void rows_in_streams(const int8_t* w, int64_t k, int64_t begin, int64_t end, F&& visit) {
  const int64_t part = run_length(end - begin, k, kRowStreams);
  int64_t js[kRowStreams];
  const int8_t* rows[kRowStreams];
  auto take = [&](int count, int64_t left) {  // left: the rows from js[u] to the end of its run, itself included
    for (int u = 0; u < count; ++u) {
      rows[u] = w + js[u] * k;
      prefetch_row(rows[u], k, left * k);
    }
    visit(js, rows, count);
  };
  for (int64_t p = 0; p < part; ++p) {
    for (int u = 0; u < kRowStreams; ++u) js[u] = begin + u * part + p;
    take(kRowStreams, part - p);
  }
  for (int64_t j = begin + kRowStreams * part; j < end; ++j) {
    js[0] = j;
    take(1, end - j);
  }
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

#if !defined(__AVX512BW__) && defined(__AVX2__)
// sum += a * b in int32 pairs on 256-bit registers: vpdpwssd where the CPU has AVX-VNNI, else vpmaddwd + vpaddd
inline __m256i madd_acc256(__m256i sum, __m256i a, __m256i b) {
#if defined(__AVXVNNI__)
  return _mm256_dpwssd_avx_epi32(sum, a, b);
#else
  return _mm256_add_epi32(sum, _mm256_madd_epi16(a, b));
#endif
}

// how far ahead of its reads dot_s16s8_avx2 asks for the weight row's bytes: 4 KB, 5% faster than 1 KB and 12%
// faster than none over SmolLM2's decode GEMVs on a Zen 3 (a prefetch past the weight's end is harmless)
constexpr int64_t kRowPrefetch = 4096;

// dot_s16s8 on AVX2: 32 weights per iteration (two vpmovsxbw loads, two vpmaddwd into two sums) and a software
// prefetch: 1.1x the compiler's loop of dot_s16s8 over the same stream (Zen 3)
inline int32_t dot_s16s8_avx2(const int16_t* __restrict a, const int8_t* __restrict b, int64_t n) {
  __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    _mm_prefetch(reinterpret_cast<const char*>(b + i + kRowPrefetch), _MM_HINT_T0);
    const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + i)));
    const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + i + 16)));
    s0 = madd_acc256(s0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + i)), w0);
    s1 = madd_acc256(s1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + i + 16)), w1);
  }
  const __m256i s = _mm256_add_epi32(s0, s1);
  __m128i h = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
  h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4e));
  h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0xb1));
  int32_t acc = _mm_cvtsi128_si32(h);
  for (; i < n; ++i) acc += static_cast<int32_t>(a[i]) * static_cast<int32_t>(b[i]);
  return acc;
}
#endif

#if defined(__AVX512BW__)
// sum += a * b in int32 pairs: vpdpwssd where the CPU has AVX512-VNNI, else vpmaddwd + vpaddd
inline __m512i madd_acc(__m512i sum, __m512i a, __m512i b) {
#if defined(__AVX512VNNI__)
  return _mm512_dpwssd_epi32(sum, a, b);
#else
  return _mm512_add_epi32(sum, _mm512_madd_epi16(a, b));
#endif
}

// The exact int32 dot products of R int8 weight rows with one row of int16 activations, the rows read side by
// side: each 64 activations loaded once for all R rows, two independent sums per row (the compiler's loop of
// dot_s16s8 keeps one, so vpdpwssd's latency bounds it: 14.6 GB/s on one Ice Lake core with the weight in L2).
template <int R>
inline void dots_s16s8(const int16_t* __restrict a, const int8_t* const* rows, int64_t n, int32_t* out) {
  __m512i s[R][2];
  for (int r = 0; r < R; ++r) s[r][0] = s[r][1] = _mm512_setzero_si512();
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    const __m512i x0 = _mm512_loadu_si512(a + i), x1 = _mm512_loadu_si512(a + i + 32);
    for (int r = 0; r < R; ++r) {
      const __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[r] + i)));
      const __m512i w1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[r] + i + 32)));
      s[r][0] = madd_acc(s[r][0], x0, w0);
      s[r][1] = madd_acc(s[r][1], x1, w1);
    }
  }
  for (int r = 0; r < R; ++r) {
    out[r] = _mm512_reduce_add_epi32(_mm512_add_epi32(s[r][0], s[r][1])) + dot_s16s8(a + i, rows[r] + i, n - i);
  }
}

#if defined(__AVX512VNNI__)
// The exact int32 dot products of R int8 weight rows with one row of uint8 activations (vpdpbusd), the rows read
// side by side as in dots_s16s8
template <int R>
inline void dots_u8s8(const uint8_t* __restrict a, const int8_t* const* rows, int64_t n, int32_t* out) {
  __m512i s[R][2];
  for (int r = 0; r < R; ++r) s[r][0] = s[r][1] = _mm512_setzero_si512();
  int64_t i = 0;
  for (; i + 128 <= n; i += 128) {
    const __m512i x0 = _mm512_loadu_si512(a + i), x1 = _mm512_loadu_si512(a + i + 64);
    for (int r = 0; r < R; ++r) {
      s[r][0] = _mm512_dpbusd_epi32(s[r][0], x0, _mm512_loadu_si512(rows[r] + i));
      s[r][1] = _mm512_dpbusd_epi32(s[r][1], x1, _mm512_loadu_si512(rows[r] + i + 64));
    }
  }
  if (i + 64 <= n) {
    const __m512i x0 = _mm512_loadu_si512(a + i);
    for (int r = 0; r < R; ++r) s[r][0] = _mm512_dpbusd_epi32(s[r][0], x0, _mm512_loadu_si512(rows[r] + i));
    i += 64;
  }
  for (int r = 0; r < R; ++r) {
    out[r] = _mm512_reduce_add_epi32(_mm512_add_epi32(s[r][0], s[r][1])) + dot_u8s8(a + i, rows[r] + i, n - i);
  }
}
#endif

// Weight rows of int4_gemv with AVX-512, for groups that are multiples of 64 channels, ROWS at a time
// (they share the activations' loads): per 64 weights (32 bytes) the nibbles are widened to int16 and
// multiplied with the int16 activations pairwise into 16 int32 lanes; each group's lanes go to float and
// are scaled into one float accumulator per row, so the only horizontal sum is the row's last one.
// out[r] = sum_g scale_r[g] * sum_k x_q[k] q_r[k] (the zero points are taken out by the caller).
template <int ROWS>
inline void rows_u4s16_avx512(const int16_t* __restrict lo, const int16_t* __restrict hi, const uint8_t* const* w,
                              const float* const* scale, int64_t groups, int64_t half, float* out) {
  const __m512i low_mask = _mm512_set1_epi16(15);
  __m512 acc[ROWS];
  for (int r = 0; r < ROWS; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512i sum[ROWS];
    for (int r = 0; r < ROWS; ++r) sum[r] = _mm512_setzero_si512();
    for (int64_t b = g * half; b < (g + 1) * half; b += 32) {
      const __m512i a_lo = _mm512_loadu_si512(lo + b), a_hi = _mm512_loadu_si512(hi + b);
      for (int r = 0; r < ROWS; ++r) {
        const __m512i w16 = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[r] + b)));
        sum[r] = madd_acc(sum[r], a_lo, _mm512_and_si512(w16, low_mask));
        sum[r] = madd_acc(sum[r], a_hi, _mm512_srli_epi16(w16, 4));
      }
    }
    for (int r = 0; r < ROWS; ++r) acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[r]), _mm512_set1_ps(scale[r][g]), acc[r]);
  }
  for (int r = 0; r < ROWS; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
}

// The same for groups of 32 channels (16 bytes: llama.cpp's Q4_0 / Q4_1 blocks), two groups per 32 bytes: the
// 16 int32 lanes are 8 of one group then 8 of the next, scaled by a vector of the two groups' scales.
template <int ROWS>
inline void rows_u4s16_avx512_g32(const int16_t* __restrict lo, const int16_t* __restrict hi,
                                  const uint8_t* const* w, const float* const* scale, int64_t groups, float* out) {
  const __m512i low_mask = _mm512_set1_epi16(15);
  __m512 acc[ROWS];
  for (int r = 0; r < ROWS; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; g += 2) {
    const int64_t b = g * 16;
    const __m512i a_lo = _mm512_loadu_si512(lo + b), a_hi = _mm512_loadu_si512(hi + b);
    for (int r = 0; r < ROWS; ++r) {
      const __m512i w16 = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[r] + b)));
      __m512i sum = madd_acc(_mm512_setzero_si512(), a_lo, _mm512_and_si512(w16, low_mask));
      sum = madd_acc(sum, a_hi, _mm512_srli_epi16(w16, 4));
      const __m512 two = _mm512_castpd_ps(_mm512_insertf64x4(
          _mm512_castps_pd(_mm512_castps256_ps512(_mm256_set1_ps(scale[r][g]))),
          _mm256_castps_pd(_mm256_set1_ps(scale[r][g + 1])), 1));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), two, acc[r]);
    }
  }
  for (int r = 0; r < ROWS; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
}

// Whether the AVX-512 row kernels take groups of `half` bytes, `groups` of them per row
inline bool avx512_takes(int64_t half, int64_t groups) {
  return half % 32 == 0 || (half == 16 && groups % 2 == 0);
}

// ROWS weight rows from `w` with the kernel that fits the group (where avx512_takes(half, groups))
template <int ROWS>
inline void rows_u4s16(const int16_t* lo, const int16_t* hi, const uint8_t* const* w, const float* const* scale,
                       int64_t groups, int64_t half, float* out) {
  if (half % 32 == 0) {
    rows_u4s16_avx512<ROWS>(lo, hi, w, scale, groups, half, out);
  } else {
    rows_u4s16_avx512_g32<ROWS>(lo, hi, w, scale, groups, out);
  }
}
#endif

// sum_j a_lo[j] * (b[j] & 15) + a_hi[j] * (b[j] >> 4) over one group's bytes, exact in int32
inline int32_t dot_u4s16(const int16_t* __restrict a_lo, const int16_t* __restrict a_hi, const uint8_t* __restrict b,
                         int64_t n) {
  int32_t acc = 0;
  for (int64_t j = 0; j < n; ++j) {
    acc += static_cast<int32_t>(a_lo[j]) * static_cast<int32_t>(b[j] & 15) +
           static_cast<int32_t>(a_hi[j]) * static_cast<int32_t>(b[j] >> 4);
  }
  return acc;
}

// The fixed-point step of one row of activations: its largest magnitude over qmax levels (1 for a zero row)
inline float fixed_point_step(const float* row, int64_t k, float qmax) {
  float absmax = 0.f;
  for (int64_t c = 0; c < k; ++c) absmax = std::max(absmax, std::fabs(row[c]));
  return absmax > 0.f ? absmax / qmax : 1.f;
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
  TORCH_CHECK(x_zero_point >= 0 && x_zero_point <= 255, "int8_gemv: the uint8 activations' zero point must be in "
              "[0, 255], got ", x_zero_point);
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
#if defined(__AVX512VNNI__) || defined(__AVXVNNI__)
  at::parallel_for(0, n, grain(k), [&](int64_t begin, int64_t end) {
    rows_in_streams(wp, k, begin, end, [&](const int64_t* js, const int8_t* const* rows, int count) {
      for (int64_t i = 0; i < m; ++i) {
        int32_t dots[kRowStreams];
#if defined(__AVX512BW__) && defined(__AVX512VNNI__)  // where dots_u8s8 is built
        if (count == kRowStreams) {
          dots_u8s8<kRowStreams>(xp + i * k, rows, k, dots);
        } else {
          dots_u8s8<1>(xp + i * k, rows, k, dots);
        }
#else
        for (int u = 0; u < count; ++u) dots[u] = dot_u8s8(xp + i * k, rows[u], k);
#endif
        for (int u = 0; u < count; ++u) op[i * n + js[u]] = static_cast<float>(dots[u] - zp * rs[js[u]]) * sp[js[u]];
      }
    });
  });
#else
  // Without VNNI the compiler's uint8 x int8 loop is slow (10 GB/s over SmolLM2's decode GEMVs on a Zen 3, whose
  // read bandwidth is 30): the activations minus their zero point, in [-255, 255], as int16, into an int16 x int8
  // dot (vpmovsxbw + vpmaddwd; on AVX2 with a prefetch): 1.3x-1.4x faster there (examples/bench_gemv_revisions.py
  // --op int8). The same int32 sums: sum (x - zp) w.
  std::vector<int16_t> xs(m * k);
  for (int64_t c = 0; c < m * k; ++c) xs[c] = static_cast<int16_t>(static_cast<int32_t>(xp[c]) - zp);
  at::parallel_for(0, n, grain(k), [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      for (int64_t i = 0; i < m; ++i) {
#if !defined(__AVX512BW__) && defined(__AVX2__)
        op[i * n + j] = static_cast<float>(dot_s16s8_avx2(xs.data() + i * k, wp + j * k, k)) * sp[j];
#else
        op[i * n + j] = static_cast<float>(dot_s16s8(xs.data() + i * k, wp + j * k, k)) * sp[j];
#endif
      }
    }
  });
#endif
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
    xs[i] = fixed_point_step(xp + i * k, k, qmax);
    for (int64_t c = 0; c < k; ++c) xq[i * k + c] = static_cast<int16_t>(std::nearbyint(xp[i * k + c] / xs[i]));
  }
  auto out = at::empty({m, n}, x.options());
  const int8_t* wp = w_q.data_ptr<int8_t>();
  const float* sp = w_scale.contiguous().data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, n, grain(k), [&](int64_t begin, int64_t end) {
    rows_in_streams(wp, k, begin, end, [&](const int64_t* js, const int8_t* const* rows, int count) {
      for (int64_t i = 0; i < m; ++i) {
        int32_t dots[kRowStreams];
#if defined(__AVX512BW__)
        if (count == kRowStreams) {
          dots_s16s8<kRowStreams>(xq.data() + i * k, rows, k, dots);
        } else {
          dots_s16s8<1>(xq.data() + i * k, rows, k, dots);
        }
#else
        for (int u = 0; u < count; ++u) dots[u] = dot_s16s8(xq.data() + i * k, rows[u], k);
#endif
        for (int u = 0; u < count; ++u) op[i * n + js[u]] = static_cast<float>(dots[u]) * (sp[js[u]] * xs[i]);
      }
    });
  });
  return out.reshape(out_sizes(x, n));
}

// x @ W.T with W = (q - zero) * scale per group of `group` input channels, float32 activations; q packed
// two per byte as lowering/kernels/reference.pack_int4 does (byte j: q[2j] low nibble, q[2j+1] high).
// Each row of x is rounded to fixed point first, as int8_weight_gemv does (int16 with the most levels an
// exact int32 sum over one group allows: 32767 unless a group is wider than 4,369 channels), so a group's
// sum is an integer dot product the CPU runs on its int16 units (vpmaddwd / vpdpwssd): 64 weights per
// few instructions where a float loop converts every nibble. Per group:
//   scale * (sum_k x_q[k] q[k] - zero * sum_k x_q[k]) * x_step
// with x_step the row's fixed-point step: the only rounding is that of x, below 0.5 / 32767 of the
// row's largest value (ATen's int4 CPU kernel rounds x to bf16, 2^-9).
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
  TORCH_CHECK(scale.scalar_type() == at::kFloat && zero.scalar_type() == at::kFloat,
              "int4_gemv: scale and zero must be float32");
  const auto x2 = x.reshape({-1, k}).contiguous();
  const int64_t m = x2.size(0);
  const float qmax = static_cast<float>(std::min<int64_t>(32767, 2147483647LL / (15 * std::max<int64_t>(group, 1))));
  // per row: even and odd columns apart (the low and high nibbles of a byte), the step, each group's sum
  std::vector<int16_t> even(m * (k / 2)), odd(m * (k / 2));
  std::vector<float> step(m), gsum(m * groups);
  const float* xp = x2.data_ptr<float>();
  for (int64_t i = 0; i < m; ++i) {
    const float* row = xp + i * k;
    step[i] = fixed_point_step(row, k, qmax);
    const float inv = 1.f / step[i];
    for (int64_t g = 0; g < groups; ++g) {
      int32_t sum = 0;
      for (int64_t j = g * half; j < (g + 1) * half; ++j) {
        const int16_t lo = static_cast<int16_t>(std::nearbyint(row[2 * j] * inv));
        const int16_t hi = static_cast<int16_t>(std::nearbyint(row[2 * j + 1] * inv));
        even[i * (k / 2) + j] = lo;
        odd[i * (k / 2) + j] = hi;
        sum += lo + hi;
      }
      gsum[i * groups + g] = static_cast<float>(sum);
    }
  }
  auto out = at::empty({m, n}, x.options());
  const uint8_t* wp = w_packed.data_ptr<uint8_t>();
  const auto sc = scale.contiguous(), zc = zero.contiguous();
  const float* sp = sc.data_ptr<float>();
  const float* zp = zc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // sum_g scale * zero * (the group's sum of x_q): the zero points' part of output j for row i
  auto zero_part = [&](int64_t j, int64_t i) {
    float z = 0.f;
    for (int64_t g = 0; g < groups; ++g) z += sp[j * groups + g] * zp[j * groups + g] * gsum[i * groups + g];
    return z;
  };
  at::parallel_for(0, n, grain(k / 2), [&](int64_t begin, int64_t end) {
    int64_t j = begin;
#if defined(__AVX512BW__)
    if (avx512_takes(half, groups)) {
      constexpr int kRows = 4;  // weight rows per pass over the activations
      for (; j + kRows <= end; j += kRows) {
        const uint8_t* rows[kRows];
        const float* scales[kRows];
        for (int r = 0; r < kRows; ++r) {
          rows[r] = wp + (j + r) * (k / 2);
          scales[r] = sp + (j + r) * groups;
        }
        for (int64_t i = 0; i < m; ++i) {
          float dots[kRows];
          rows_u4s16<kRows>(even.data() + i * (k / 2), odd.data() + i * (k / 2), rows, scales, groups, half, dots);
          for (int r = 0; r < kRows; ++r) op[i * n + j + r] = (dots[r] - zero_part(j + r, i)) * step[i];
        }
      }
      for (; j < end; ++j) {
        const uint8_t* rows[1] = {wp + j * (k / 2)};
        const float* scales[1] = {sp + j * groups};
        for (int64_t i = 0; i < m; ++i) {
          float dot;
          rows_u4s16<1>(even.data() + i * (k / 2), odd.data() + i * (k / 2), rows, scales, groups, half, &dot);
          op[i * n + j] = (dot - zero_part(j, i)) * step[i];
        }
      }
    }
#endif
    for (; j < end; ++j) {
      const uint8_t* wrow = wp + j * (k / 2);
      for (int64_t i = 0; i < m; ++i) {
        const int16_t* e = even.data() + i * (k / 2);
        const int16_t* o = odd.data() + i * (k / 2);
        float acc = 0.f;
        for (int64_t g = 0; g < groups; ++g) {
          const int32_t dot = dot_u4s16(e + g * half, o + g * half, wrow + g * half, half);
          acc += sp[j * groups + g] * (static_cast<float>(dot) - zp[j * groups + g] * gsum[i * groups + g]);
        }
        op[i * n + j] = acc * step[i];
      }
    }
  });
  return out.reshape(out_sizes(x, n));
}

// The int4 GEMV on weights in tiles of 32 output channels (lowering/kernels/reference.pack_int4_tiled), for
// CPUs with AVX-512 or AVX2: a tile's sums sit in registers of 16 rows (AVX-512) or 8 (AVX2), so a step of 4
// input channels is one pass over the tile's 64 bytes (loads, masks/shifts and vpdpwssd against the
// activations' pairs broadcast), and the group scales are applied to 16 rows with one multiply-add (the row
// layout above spends a convert, a multiply-add and a horizontal sum per row and group). Tile t's bytes: for
// each step s of 4 channels (k = 4 s), for each row r, b0 = q[r, k] | q[r, k + 2] << 4 and
// b1 = q[r, k + 1] | q[r, k + 3] << 4: 64 bytes per step, so a thread reads one tile front to back in whole
// cache lines (tiles of 16 rows, read two at a time, were two streams of half lines: 20% slower on a Zen 4).
// scale and zero are [N / 32, G, 32] (a group's 32 values contiguous). The arithmetic of int4_gemv (int16
// fixed-point activations, exact integer sums), with the sums flushed to float at most every 256 channels
// within a group, so the activations keep 32767 levels at any group width (int4_gemv takes fewer above 4,369
// channels).
namespace {

constexpr int64_t kTile = 32;
constexpr int64_t kStepBytes = 2 * kTile;  // bytes of one step of 4 channels in a tile
constexpr int64_t kFlushSteps = 64;  // steps of 4 channels per int32 sum: 64 x 4 x 32767 x 15 < 2^31
// how far ahead of its reads a thread asks for each tile's bytes, into L1 (AVX-512: 32 steps, with kStreams tiles
// read side by side; 16 to 64 steps measured the same within the host's noise on an Ice Lake Xeon, into L2 the
// same or slower; one tile at a time, 16 steps into L1 were 2-9% faster than the hardware prefetcher alone on a
// Zen 4; a prefetch past the weight's end is harmless)
constexpr int64_t kPrefetch = 32 * kStepBytes;
constexpr int64_t kPrefetchAvx2 = 16 * kStepBytes;  // the AVX2 tile kernel's, into L1 (as measured on a Zen 4)

#if defined(__AVX512BW__)
// two int16 activations as one int32, in every lane (a broadcast from memory: no general register)
inline __m512i broadcast_pair(const int16_t* x) { return _mm512_broadcastd_epi32(_mm_loadu_si32(x)); }
// 32 bytes widened to 32 int16 words
inline __m512i load_widened(const uint8_t* p) {
  return _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// How many tiles a thread reads side by side with AVX-512, each from another part of its share of the weight:
// as many sequential streams, which the L2 streamer fetches ahead at once where one stream waits on its own
// misses. SmolLM2's 120 w4a16 decode GEMVs on an Ice Lake Xeon (examples/bench_gemv_revisions.py, 2 threads):
// 4 streams 0.85-0.88x the time of 1, 2 streams 0.92x, 8 streams no faster than 1 (their sums leave the
// registers); a read-only loop over 256 MB reached 18, 23 and 27 GB/s there with 1, 2 and 4 streams a thread.
constexpr int kStreams = 4;

// The 32 outputs of each of T tiles for one row of activations (xq: int16 [K], gsum: float [G]), the tiles read
// side by side: rows 0-15 and 16-31 of a tile in one register each, two steps per iteration, and independent
// int32 sums that keep vpdpwssd's latency hidden: 4 per 16-row register for one tile (8 in all), 2 per register
// when several tiles interleave (4 T). The same integer sums and float operations in the same order for any T (the outputs equal bit for bit).
template <int T>
inline void tiles_u4s16(const int16_t* __restrict xq, const float* __restrict gsum, const uint8_t* const* tiles,
                        const float* const* scales, const float* const* zeros, int64_t groups, int64_t group,
                        float step, float* const* outs) {
  constexpr int J = T == 1 ? 4 : 2;
  const int64_t steps = group / 4;
  const __m512i low_mask = _mm512_set1_epi16(15);
  __m512 acc[T][2];
  for (int u = 0; u < T; ++u) acc[u][0] = acc[u][1] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t first = g * steps;
    for (int64_t s0 = 0; s0 < steps; s0 += kFlushSteps) {
      const int64_t s1 = std::min(steps, s0 + kFlushSteps);
      __m512i a[T][2][J];
      for (int u = 0; u < T; ++u)
        for (int h = 0; h < 2; ++h)
          for (int j = 0; j < J; ++j) a[u][h][j] = _mm512_setzero_si512();
      int64_t s = s0;
      for (; s + 2 <= s1; s += 2) {
        const int16_t* x = xq + (first + s) * 4;
        const __m512i x0 = broadcast_pair(x), x1 = broadcast_pair(x + 2);
        const __m512i x2 = broadcast_pair(x + 4), x3 = broadcast_pair(x + 6);
        for (int u = 0; u < T; ++u) {
          const uint8_t* w = tiles[u] + (first + s) * kStepBytes;
          _mm_prefetch(reinterpret_cast<const char*>(w + kPrefetch), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(w + kPrefetch + kStepBytes), _MM_HINT_T0);
          for (int h = 0; h < 2; ++h) {
            const __m512i w0 = load_widened(w + 32 * h), w1 = load_widened(w + kStepBytes + 32 * h);
            a[u][h][0] = madd_acc(a[u][h][0], _mm512_and_si512(w0, low_mask), x0);
            a[u][h][1] = madd_acc(a[u][h][1], _mm512_srli_epi16(w0, 4), x1);
            a[u][h][2 % J] = madd_acc(a[u][h][2 % J], _mm512_and_si512(w1, low_mask), x2);
            a[u][h][3 % J] = madd_acc(a[u][h][3 % J], _mm512_srli_epi16(w1, 4), x3);
          }
        }
      }
      if (s < s1) {
        const int16_t* x = xq + (first + s) * 4;
        const __m512i x0 = broadcast_pair(x), x1 = broadcast_pair(x + 2);
        for (int u = 0; u < T; ++u)
          for (int h = 0; h < 2; ++h) {
            const __m512i w0 = load_widened(tiles[u] + (first + s) * kStepBytes + 32 * h);
            a[u][h][0] = madd_acc(a[u][h][0], _mm512_and_si512(w0, low_mask), x0);
            a[u][h][1] = madd_acc(a[u][h][1], _mm512_srli_epi16(w0, 4), x1);
          }
      }
      for (int u = 0; u < T; ++u)
        for (int h = 0; h < 2; ++h) {
          __m512i sum = _mm512_add_epi32(a[u][h][0], a[u][h][1]);
          if (J == 4) sum = _mm512_add_epi32(sum, _mm512_add_epi32(a[u][h][2 % J], a[u][h][3 % J]));
          acc[u][h] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_loadu_ps(scales[u] + g * kTile + 16 * h),
                                      acc[u][h]);
        }
    }
    const __m512 gs = _mm512_set1_ps(gsum[g]);  // the zero points' part: scale * zero * (the group's sum of x_q)
    for (int u = 0; u < T; ++u)
      for (int h = 0; h < 2; ++h) {
        const int64_t at = g * kTile + 16 * h;
        acc[u][h] = _mm512_fnmadd_ps(_mm512_mul_ps(_mm512_loadu_ps(scales[u] + at), _mm512_loadu_ps(zeros[u] + at)),
                                     gs, acc[u][h]);
      }
  }
  for (int u = 0; u < T; ++u)
    for (int h = 0; h < 2; ++h) _mm512_storeu_ps(outs[u] + 16 * h, _mm512_mul_ps(acc[u][h], _mm512_set1_ps(step)));
}

// What int4_gemv_tiled's threads share: the activations in fixed point and where the weight, parameters and
// outputs are
struct TiledGemv {
  const int16_t* xq;  // [M, K]
  const float* gsum;  // [M, G]
  const float* step;  // [M]
  const uint8_t* w;
  const float* scale;
  const float* zero;
  float* out;  // [M, N]
  int64_t m, n, k, groups, group, tile_bytes, tile_params;
};

// Tiles first, first + stride, ..., first + (T - 1) stride side by side, for every row of activations
template <int T>
void tiles_side_by_side(const TiledGemv& a, int64_t first, int64_t stride) {
  const uint8_t* tiles[T];
  const float* scales[T];
  const float* zeros[T];
  float* outs[T];
  for (int64_t i = 0; i < a.m; ++i) {
    for (int u = 0; u < T; ++u) {
      const int64_t t = first + u * stride;
      tiles[u] = a.w + t * a.tile_bytes;
      scales[u] = a.scale + t * a.tile_params;
      zeros[u] = a.zero + t * a.tile_params;
      outs[u] = a.out + i * a.n + t * kTile;
    }
    tiles_u4s16<T>(a.xq + i * a.k, a.gsum + i * a.groups, tiles, scales, zeros, a.groups, a.group, a.step[i], outs);
  }
}

// A thread's tiles [begin, end): kStreams runs of `part` tiles read side by side, then the rest kStreams adjacent
// tiles at a time and the last 1-3 together
void tiles_of_thread(const TiledGemv& a, int64_t begin, int64_t end) {
  const int64_t part = run_length(end - begin, a.tile_bytes, kStreams);
  for (int64_t p = 0; p < part; ++p) tiles_side_by_side<kStreams>(a, begin + p, part);
  int64_t t = begin + kStreams * part;
  for (; t + kStreams <= end; t += kStreams) tiles_side_by_side<kStreams>(a, t, 1);
  switch (end - t) {  // fewer than kStreams
    case 3: tiles_side_by_side<3>(a, t, 1); break;
    case 2: tiles_side_by_side<2>(a, t, 1); break;
    case 1: tiles_side_by_side<1>(a, t, 1); break;
    default: break;
  }
}
#endif

#if !defined(__AVX512BW__) && defined(__AVX2__)
inline __m256i broadcast_pair256(const int16_t* x) {
  int32_t pair;
  std::memcpy(&pair, x, sizeof(pair));
  return _mm256_set1_epi32(pair);
}
// 16 bytes (8 rows' two bytes of one step) widened to 16 int16 words
inline __m256i load_widened256(const uint8_t* p) {
  return _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// One tile's 32 outputs for one row of activations with AVX2 (the AVX-512 tiles_u4s16 for one tile): a tile's
// 32 rows are four 256-bit registers of 8 (bytes 16 q to 16 q + 15 of a step hold rows 8 q to 8 q + 7), each fed
// one 16-byte load per step; the same sums and flushes.
inline void tile_u4s16(const int16_t* __restrict xq, const float* __restrict gsum, const uint8_t* __restrict tile,
                       const float* __restrict scale, const float* __restrict zero, int64_t groups, int64_t group,
                       float step, float* __restrict out) {
  const int64_t steps = group / 4;
  const __m256i low_mask = _mm256_set1_epi16(15);
  __m256 acc[4];
  for (int q = 0; q < 4; ++q) acc[q] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t first = g * steps;
    for (int64_t s0 = 0; s0 < steps; s0 += kFlushSteps) {
      const int64_t s1 = std::min(steps, s0 + kFlushSteps);
      __m256i a[4];
      for (int q = 0; q < 4; ++q) a[q] = _mm256_setzero_si256();
      for (int64_t s = s0; s < s1; ++s) {
        const int16_t* x = xq + (first + s) * 4;
        const __m256i x0 = broadcast_pair256(x), x1 = broadcast_pair256(x + 2);
        const uint8_t* w = tile + (first + s) * kStepBytes;
        _mm_prefetch(reinterpret_cast<const char*>(w + kPrefetchAvx2), _MM_HINT_T0);
        for (int q = 0; q < 4; ++q) {
          const __m256i w16 = load_widened256(w + 16 * q);
          a[q] = madd_acc256(a[q], _mm256_and_si256(w16, low_mask), x0);
          a[q] = madd_acc256(a[q], _mm256_srli_epi16(w16, 4), x1);
        }
      }
      for (int q = 0; q < 4; ++q) {
        acc[q] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[q]), _mm256_loadu_ps(scale + g * kTile + 8 * q), acc[q]);
      }
    }
    const __m256 gs = _mm256_set1_ps(gsum[g]);  // the zero points' part, as in the AVX-512 tiles_u4s16
    for (int q = 0; q < 4; ++q) {
      const int64_t at = g * kTile + 8 * q;
      acc[q] = _mm256_fnmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(scale + at), _mm256_loadu_ps(zero + at)), gs, acc[q]);
    }
  }
  const __m256 st = _mm256_set1_ps(step);
  for (int q = 0; q < 4; ++q) _mm256_storeu_ps(out + 8 * q, _mm256_mul_ps(acc[q], st));
}
#endif

// One tile's 32 outputs for one row of activations, without AVX-512 or AVX2 (the same sums, as plain loops).
inline void tile_u4s16_generic(const int16_t* __restrict xq, const float* __restrict gsum,
                               const uint8_t* __restrict tile, const float* __restrict scale,
                               const float* __restrict zero, int64_t groups, int64_t group, float step,
                               float* __restrict out) {
  const int64_t steps = group / 4;
  float acc[kTile] = {};
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t s0 = 0; s0 < steps; s0 += kFlushSteps) {
      const int64_t s1 = std::min(steps, s0 + kFlushSteps);
      int32_t sum[kTile] = {};
      for (int64_t s = g * steps + s0; s < g * steps + s1; ++s) {
        const int16_t* x = xq + s * 4;
        const uint8_t* b = tile + s * kStepBytes;
        for (int64_t r = 0; r < kTile; ++r) {
          const int32_t b0 = b[2 * r], b1 = b[2 * r + 1];
          sum[r] += x[0] * (b0 & 15) + x[1] * (b1 & 15) + x[2] * (b0 >> 4) + x[3] * (b1 >> 4);
        }
      }
      for (int64_t r = 0; r < kTile; ++r) acc[r] += static_cast<float>(sum[r]) * scale[g * kTile + r];
    }
    for (int64_t r = 0; r < kTile; ++r) acc[r] -= scale[g * kTile + r] * zero[g * kTile + r] * gsum[g];
  }
  for (int64_t r = 0; r < kTile; ++r) out[r] = acc[r] * step;
}

}  // namespace

// x @ W.T as int4_gemv computes it, on the tiled layout above: w_tiled uint8 [N / 32, 16 K], scale and zero
// float32 [N / 32, G, 32] (G = K / group), group a multiple of 4.
at::Tensor int4_gemv_tiled(const at::Tensor& x, const at::Tensor& w_tiled, const at::Tensor& scale,
                           const at::Tensor& zero, int64_t group) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "int4_gemv_tiled takes float32 activations, got ", x.scalar_type());
  TORCH_CHECK(w_tiled.scalar_type() == at::kByte && w_tiled.dim() == 2 && w_tiled.is_contiguous() &&
                  w_tiled.size(1) % kStepBytes == 0,
              "int4_gemv_tiled takes a contiguous uint8 tiled weight [N / 32, 16 K]");
  const int64_t tiles = w_tiled.size(0), n = tiles * kTile, k = w_tiled.size(1) * 2 / kTile;
  TORCH_CHECK(x.size(-1) == k, "int4_gemv_tiled: x has K=", x.size(-1), ", the tiled weight ", k);
  TORCH_CHECK(k > 0, "int4_gemv_tiled: the tiled weight has no input channels (K=0)");
  TORCH_CHECK(group >= 4 && group % 4 == 0 && k % group == 0, "int4_gemv_tiled: group ", group, " does not fit K=", k);
  const int64_t groups = k / group;
  TORCH_CHECK(scale.scalar_type() == at::kFloat && zero.scalar_type() == at::kFloat &&
                  scale.numel() == n * groups && zero.numel() == n * groups,
              "int4_gemv_tiled: scale and zero must be float32 [N / 32, K / group, 32]");
  const auto x2 = x.reshape({-1, k}).contiguous();
  const int64_t m = x2.size(0);
  std::vector<int16_t> xq(m * k);
  std::vector<float> step(m), gsum(m * groups);
  const float* xp = x2.data_ptr<float>();
  for (int64_t i = 0; i < m; ++i) {  // int16 fixed point with 32767 levels, as int4_gemv rounds
    const float* row = xp + i * k;
    step[i] = fixed_point_step(row, k, 32767.f);
    const float inv = 1.f / step[i];
    for (int64_t g = 0; g < groups; ++g) {
      int32_t sum = 0;
      for (int64_t c = g * group; c < (g + 1) * group; ++c) {
        xq[i * k + c] = static_cast<int16_t>(std::nearbyint(row[c] * inv));
        sum += xq[i * k + c];
      }
      gsum[i * groups + g] = static_cast<float>(sum);
    }
  }
  auto out = at::empty({m, n}, x.options());
  const uint8_t* wp = w_tiled.data_ptr<uint8_t>();
  const auto sc = scale.contiguous(), zc = zero.contiguous();
  const float* sp = sc.data_ptr<float>();
  const float* zp = zc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t tile_bytes = kTile * k / 2, tile_params = groups * kTile;
  at::parallel_for(0, tiles, std::max<int64_t>(1, kMinBytes / tile_bytes), [&](int64_t begin, int64_t end) {
#if defined(__AVX512BW__)
    const TiledGemv args{xq.data(), gsum.data(), step.data(), wp, sp, zp, op, m, n, k, groups, group, tile_bytes,
                         tile_params};
    tiles_of_thread(args, begin, end);
#else
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t i = 0; i < m; ++i) {
#if defined(__AVX2__)  // tile_u4s16: the AVX2 one
        tile_u4s16(xq.data() + i * k, gsum.data() + i * groups, wp + t * tile_bytes, sp + t * tile_params,
                   zp + t * tile_params, groups, group, step[i], op + i * n + t * kTile);
#else
        tile_u4s16_generic(xq.data() + i * k, gsum.data() + i * groups, wp + t * tile_bytes, sp + t * tile_params,
                           zp + t * tile_params, groups, group, step[i], op + i * n + t * kTile);
#endif
      }
    }
#endif
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

// Which vector code this build of the kernels runs: "avx512-vnni", "avx512", "avx2-vnni", "avx2" or "generic"
// (the loops as the compiler vectorizes them for -march=native); the lowering takes the tiled int4 layout with
// AVX-512 or AVX2 (where its intrinsics beat the row layout's vectorized loops).
std::string gemv_isa() {
#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
  return "avx512-vnni";
#elif defined(__AVX512BW__)
  return "avx512";
#elif defined(__AVX2__) && defined(__AVXVNNI__)
  return "avx2-vnni";
#elif defined(__AVX2__)
  return "avx2";
#else
  return "generic";
#endif
}

TORCH_LIBRARY_FRAGMENT(qcompiler, m) {
  m.def("int8_gemv(Tensor x_q, int x_zero_point, Tensor w_q, Tensor w_rowsum, Tensor w_scale) -> Tensor");
  m.def("int8_weight_gemv(Tensor x, Tensor w_q, Tensor w_scale) -> Tensor");
  m.def("int4_gemv(Tensor x, Tensor w_packed, Tensor scale, Tensor zero, int group_size) -> Tensor");
  m.def("int4_gemv_tiled(Tensor x, Tensor w_tiled, Tensor scale, Tensor zero, int group_size) -> Tensor");
  m.def("gemv_threads(int tasks) -> int", &gemv_threads);
  m.def("gemv_isa() -> str", &gemv_isa);
}

TORCH_LIBRARY_IMPL(qcompiler, CPU, m) {
  m.impl("int8_gemv", &int8_gemv);
  m.impl("int8_weight_gemv", &int8_weight_gemv);
  m.impl("int4_gemv", &int4_gemv);
  m.impl("int4_gemv_tiled", &int4_gemv_tiled);
}
