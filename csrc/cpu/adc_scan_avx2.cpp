// The AVX2 ADC scanner: the interleaved-table exact filter (adc_interleaved_scan.h), sixteen queries
// per group, one int16 lane each: a row of 16 bytes widened by vpmovzxbw per code and book. Fewer
// than kMinQueries queries, more than 128 books (sums past int16) and ranges of at most 2k codes
// (where every code passes) go to the scalar scanner.
#if defined(__x86_64__) || defined(__i386__)
#include <algorithm>
#include <cstdint>
#include <vector>

#include <immintrin.h>

#include "cpu/adc_filter.h"
#include "cpu/adc_scan.h"

#include "cpu/avx2_target_begin.h"

#define OPQN_ISA avx2
#include "cpu/adc_interleaved_scan.h"

namespace opqn::cpu::avx2 {
namespace {

constexpr int64_t kMinQueries = 2;  // one query: the scalar scanner is as fast

struct Lanes {
  static constexpr int64_t kLanes = kInterleavedLanesAvx2;
  static constexpr int kMaskBitsPerLane = 2;  // movemask of int16 compares
  using Vec = __m256i;
  static Vec zero() { return _mm256_setzero_si256(); }
  static Vec add_row(Vec sums, const uint8_t* row) {
    return _mm256_add_epi16(sums, _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row))));
  }
  static Vec load(const int16_t* thresholds) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(thresholds));
  }
  static uint32_t passing(Vec sums, Vec thresholds) {
    const __m256i pass = _mm256_cmpgt_epi16(sums, thresholds);
    if (_mm256_testz_si256(pass, pass)) return 0;
    return static_cast<uint32_t>(_mm256_movemask_epi8(pass)) & 0x55555555u;
  }
};

}  // namespace

void adc_scan(const float* luts, int64_t nq, const uint8_t* codes, int64_t N, int64_t M,
              int64_t first, int64_t end, TopK* tops) {
  const bool short_range = nq > 0 && 2 * tops[0].k >= end - first;
  if (nq < kMinQueries || M > kInterleavedMaxBooks || short_range)
    return scalar::adc_scan(luts, nq, codes, N, M, first, end, tops);
  scan_interleaved<Lanes>(luts, nq, codes, M, first, end, tops);
}

}  // namespace opqn::cpu::avx2

#undef OPQN_ISA
#include "cpu/avx2_target_end.h"
#endif
