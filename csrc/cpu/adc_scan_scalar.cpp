// The portable ADC scanner: one code at a time, its M table entries added in book order.
// Books are a compile-time constant for the common M, so the inner loop unrolls.
#include "cpu/adc_scan.h"

namespace opqn::cpu::scalar {
namespace {

constexpr int64_t kBlockCodes = 1024;  // codes scanned for every query before the next block

template <int64_t kM>
void scan_one(const float* lut, const uint8_t* codes, int64_t m_runtime, int64_t first,
              int64_t end, TopK& top) {
  const int64_t M = kM > 0 ? kM : m_runtime;
  float threshold = top.threshold;
  for (int64_t i = first; i < end; ++i) {
    const uint8_t* c = codes + i * M;
    float s = 0.0f;
    for (int64_t m = 0; m < M; ++m) s += lut[m * kLutStride + c[m]];
    if (s > threshold) {
      topk_offer(top, s, i);
      threshold = top.threshold;
    }
  }
}

void scan_range(const float* lut, const uint8_t* codes, int64_t M, int64_t first, int64_t end,
                TopK& top) {
  switch (M) {
    case 4: return scan_one<4>(lut, codes, M, first, end, top);
    case 8: return scan_one<8>(lut, codes, M, first, end, top);
    case 16: return scan_one<16>(lut, codes, M, first, end, top);
    case 32: return scan_one<32>(lut, codes, M, first, end, top);
    default: return scan_one<0>(lut, codes, M, first, end, top);
  }
}

}  // namespace

void adc_scan(const float* luts, int64_t nq, const uint8_t* codes, int64_t /*N*/, int64_t M,
              int64_t first, int64_t end, TopK* tops) {
  for (int64_t b0 = first; b0 < end; b0 += kBlockCodes) {
    const int64_t b1 = end - b0 < kBlockCodes ? end : b0 + kBlockCodes;
    for (int64_t q = 0; q < nq; ++q) scan_range(luts + q * M * kLutStride, codes, M, b0, b1, tops[q]);
  }
}

}  // namespace opqn::cpu::scalar
