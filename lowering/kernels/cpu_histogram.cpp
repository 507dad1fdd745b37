// The bin counts of a calibration histogram in one pass over the values (qcompiler/core/histogram.py,
// Histogram.update, one channel): the observers count every quantized layer's input on every calibration batch,
// about 50 M values per 512-token batch of SmolLM2-135M, where the torch ops (scale, floor, shift, clamp, cast,
// bincount) make seven passes. Built with cpu_gemv.cpp (lowering/kernels/native.py); the calibration observers
// (qcompiler/calibration/observers.py) call it, and the torch ops stay where it cannot be built.
//
// A value x falls in bin floor(x * 2^shift) + bins/2, clamped to [0, bins): the product is taken in double,
// where scaling a float32 by a power of two is exact, so the counts are those of the torch ops bit for bit.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kBlock = 256;  // values whose bins are computed (vectorized) before they are counted
constexpr int kCopies = 4;       // interleaved partial counts: runs of one bin do not wait on one counter

void count_range(const float* x, int64_t begin, int64_t end, double scale, int64_t bins, int64_t* counts) {
  const double half = static_cast<double>(bins / 2), top = static_cast<double>(bins - 1);
  int32_t index[kBlock];
  for (int64_t start = begin; start < end; start += kBlock) {
    const int64_t n = std::min(kBlock, end - start);
    for (int64_t i = 0; i < n; ++i) {  // vectorized (floor is one instruction); a NaN goes to bin 0
      double y = std::floor(static_cast<double>(x[start + i]) * scale) + half;
      y = y > 0.0 ? y : 0.0;
      y = y < top ? y : top;
      index[i] = static_cast<int32_t>(y);
    }
    int64_t i = 0;
    for (; i + kCopies <= n; i += kCopies) {
      for (int c = 0; c < kCopies; ++c) counts[c * bins + index[i + c]] += 1;
    }
    for (; i < n; ++i) counts[index[i]] += 1;
  }
}

}  // namespace

at::Tensor histogram_bins(const at::Tensor& x, int64_t shift, int64_t bins) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "histogram_bins takes float32 values, got ", x.scalar_type());
  // each thread keeps kCopies partial counts of all bins: at most 2 MB of them per thread
  TORCH_CHECK(bins >= 2 && bins <= (int64_t{1} << 16) && (bins & (bins - 1)) == 0,
              "histogram_bins: bins must be a power of two in [2, 65536], got ", bins);
  TORCH_CHECK(shift >= -1000 && shift <= 1000, "histogram_bins: shift ", shift, " is out of range");
  const auto flat = x.reshape({-1}).contiguous();
  const float* xp = flat.data_ptr<float>();
  const int64_t n = flat.numel();
  const double scale = std::ldexp(1.0, static_cast<int>(shift));
  const int threads = at::get_num_threads();
  std::vector<int64_t> partial(static_cast<size_t>(threads) * kCopies * bins, 0);
  at::parallel_for(0, n, 1 << 16, [&](int64_t begin, int64_t end) {
    count_range(xp, begin, end, scale, bins, partial.data() + at::get_thread_num() * kCopies * bins);
  });
  auto out = at::zeros({bins}, x.options().dtype(at::kLong));
  int64_t* op = out.data_ptr<int64_t>();
  for (int64_t c = 0; c < static_cast<int64_t>(threads) * kCopies; ++c) {
    const int64_t* p = partial.data() + c * bins;
    for (int64_t b = 0; b < bins; ++b) op[b] += p[b];
  }
  return out;
}

TORCH_LIBRARY_FRAGMENT(qcompiler, m) {
  m.def("histogram_bins(Tensor x, int shift, int bins) -> Tensor");
}

TORCH_LIBRARY_IMPL(qcompiler, CPU, m) {
  m.impl("histogram_bins", &histogram_bins);
}
