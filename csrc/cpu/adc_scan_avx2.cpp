// The AVX2 ADC scanner: eight codes at a time. For a block of codes, the word index of every
// (code, book) is gathered once into an L1-resident buffer; then every query of the call sums its
// table entries for eight codes with one gather per book, in book order (bit-identical to the
// scalar scanner), and compares the eight sums with its threshold at once: one compare per code,
// the heap touched only by codes that enter the top-k. Used only when the CPU has AVX2+FMA.
// The scan is bound by table loads (one per code, book and query, gathered or not); gathering the
// word indices pays off only when enough queries share them, so fewer queries go to the scalar
// scanner, whose 8-byte code loads are cheaper (measured: scalar faster up to 4 queries).
#if defined(__x86_64__) || defined(__i386__)
#include <cstdint>

#include <immintrin.h>

#include "cpu/adc_scan.h"

#include "cpu/avx2_target_begin.h"

namespace opqn::cpu::avx2 {
namespace {

constexpr int64_t kIndexBytes = 16384;  // word indices of one block: [groups, M, 8] int32
constexpr int64_t kGatherSlack = 3;     // a 4-byte gather of a code's last byte reads 3 bytes past it
constexpr int64_t kMinQueries = 8;      // fewer queries per call: the scalar scanner is faster

}  // namespace

void adc_scan(const float* luts, int64_t nq, const uint8_t* codes, int64_t N, int64_t M,
              int64_t first, int64_t end, TopK* tops) {
  if (nq < kMinQueries) return scalar::adc_scan(luts, nq, codes, N, M, first, end, tops);
  alignas(32) int32_t index[kIndexBytes / sizeof(int32_t)];
  const int64_t groups = kIndexBytes / (32 * M);  // >= 2: M <= 256 is checked by the op
  const __m256i lane_offsets =
      _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(static_cast<int>(M)));
  const __m256i low_byte = _mm256_set1_epi32(0xFF);
  for (int64_t b0 = first; b0 < end; b0 += groups * 8) {
    const int64_t b1 = end - b0 < groups * 8 ? end : b0 + groups * 8;
    // Codes [b0, vend) go eight at a time; gathers stay inside the codes buffer.
    int64_t vend = b0;
    while (vend + 8 <= b1 && (vend + 8) * M + kGatherSlack <= N * M) vend += 8;
    const int64_t ng = (vend - b0) / 8;
    for (int64_t g = 0; g < ng; ++g) {
      const uint8_t* base = codes + (b0 + 8 * g) * M;
      for (int64_t m = 0; m < M; ++m) {
        const __m256i words = _mm256_and_si256(
            _mm256_i32gather_epi32(reinterpret_cast<const int*>(base + m), lane_offsets, 1), low_byte);
        _mm256_store_si256(reinterpret_cast<__m256i*>(index + (g * M + m) * 8), words);
      }
    }
    for (int64_t q = 0; q < nq; ++q) {
      const float* lut = luts + q * M * kLutStride;
      TopK& top = tops[q];
      __m256 threshold = _mm256_set1_ps(top.threshold);
      for (int64_t g = 0; g < ng; ++g) {
        __m256 acc = _mm256_setzero_ps();
        for (int64_t m = 0; m < M; ++m) {
          const __m256i words = _mm256_load_si256(reinterpret_cast<const __m256i*>(index + (g * M + m) * 8));
          acc = _mm256_add_ps(acc, _mm256_i32gather_ps(lut + m * kLutStride, words, 4));
        }
        int mask = _mm256_movemask_ps(_mm256_cmp_ps(acc, threshold, _CMP_GT_OQ));
        if (mask == 0) continue;
        alignas(32) float sums[8];
        _mm256_store_ps(sums, acc);
        while (mask != 0) {
          const int j = __builtin_ctz(static_cast<unsigned>(mask));
          mask &= mask - 1;
          if (sums[j] > top.threshold) topk_offer(top, sums[j], b0 + 8 * g + j);
        }
        threshold = _mm256_set1_ps(top.threshold);
      }
      if (vend < b1) scalar::adc_scan(lut, 1, codes, N, M, vend, b1, &top);
    }
  }
}

}  // namespace opqn::cpu::avx2

#include "cpu/avx2_target_end.h"
#endif
