// row_argmax: the greedy choice of a decode step (cpu_calls.cpp's greedy_tokens). A header of its own so that
// tests/lowering/test_gemv_isas.py can build it for the vector extensions this machine does not build for.
#pragma once

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <cstdint>
#include <limits>

// The index of each row's largest value, as torch.argmax(x, -1) gives it (the first of equal maxima; where a row
// has NaN, its first NaN), for the greedy choice of a decode step. torch.argmax does not vectorize this
// reduction: about 70 us over SmolLM2's 49152 logits on a 2-core Xeon (Ice Lake), where these two passes (the
// maximum, then the first position that holds it) take 7 us with AVX-512.
inline int64_t row_argmax(const float* p, int64_t n) {
  float top = -std::numeric_limits<float>::infinity();
  bool nan = false;
  int64_t i = 0;
#if defined(__AVX512F__)
  __m512 top0 = _mm512_set1_ps(top), top1 = top0;
  __mmask16 unordered = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512 a = _mm512_loadu_ps(p + i), b = _mm512_loadu_ps(p + i + 16);
    top0 = _mm512_max_ps(top0, a);
    top1 = _mm512_max_ps(top1, b);
    unordered |= _mm512_cmp_ps_mask(a, b, _CMP_UNORD_Q);  // a NaN in either
  }
  top = _mm512_reduce_max_ps(_mm512_max_ps(top0, top1));
  nan = unordered != 0;
#elif defined(__AVX2__)
  __m256 top0 = _mm256_set1_ps(top), unordered = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 a = _mm256_loadu_ps(p + i);
    top0 = _mm256_max_ps(top0, a);
    unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, top0);
  for (float v : lanes) top = v > top ? v : top;
  nan = _mm256_movemask_ps(unordered) != 0;
#endif
  for (; i < n; ++i) top = p[i] > top ? p[i] : top, nan |= p[i] != p[i];
  int64_t k = 0;
#if defined(__AVX512F__)
  const __m512 wanted = _mm512_set1_ps(top);
  for (; k + 16 <= n; k += 16) {
    const __m512 a = _mm512_loadu_ps(p + k);
    const __mmask16 hit = nan ? _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q) : _mm512_cmp_ps_mask(a, wanted, _CMP_EQ_OQ);
    if (hit) return k + __builtin_ctz(hit);
  }
#elif defined(__AVX2__)
  const __m256 wanted = _mm256_set1_ps(top);
  for (; k + 8 <= n; k += 8) {
    const __m256 a = _mm256_loadu_ps(p + k);
    const int hit = _mm256_movemask_ps(nan ? _mm256_cmp_ps(a, a, _CMP_UNORD_Q) : _mm256_cmp_ps(a, wanted, _CMP_EQ_OQ));
    if (hit) return k + __builtin_ctz(hit);
  }
#endif
  for (; k < n; ++k) {
    if (nan ? p[k] != p[k] : p[k] == top) return k;
  }
  return 0;  // (not reached: a value equals the maximum, or is the NaN found)
}
