// The AVX-512 4-bit scanner: the AVX2 scanner's sums (fastscan4_avx2.cpp) on 512-bit vectors. One
// 64-byte load holds the words of two book pairs for 32 codes, and one vpshufb looks them up in
// their four 16-entry tables (one per 128-bit lane); a last odd pair goes alone, its upper half
// zero (zero tables add nothing). At the end the four lanes of even sums of codes 0..15, of 16..31,
// and of odd sums of both are added into one register's four lanes by three pairs of lane
// shuffles, and one compare gives the mask of passing codes. The sums are the same integers as the
// other scanners', so the same codes are kept. Queries go four at a time (32 vector registers). The
// scan loop around the sums is fastscan4_scan.h.
#if defined(__x86_64__) || defined(__i386__)
#include <algorithm>
#include <cstdint>
#include <vector>

#include <immintrin.h>

#include "cpu/fastscan4.h"

#include "cpu/avx512_target_begin.h"

#define OPQN_ISA avx512
#include "cpu/fastscan4_scan.h"

namespace opqn::cpu::avx512 {
namespace {

// 128-bit lanes [a0, a2, b0, b2] + [a1, a3, b1, b3]. (__builtin_shufflevector rather than
// vshufi64x2, and masked loads rather than zero extensions below, because GCC 12's versions of those
// intrinsics draw false uninitialized-value warnings.)
inline __m512i add_lane_pairs(__m512i a, __m512i b) {
  return _mm512_add_epi16(__builtin_shufflevector(a, b, 0, 1, 4, 5, 8, 9, 12, 13),
                          __builtin_shufflevector(a, b, 2, 3, 6, 7, 10, 11, 14, 15));
}

// 32 bytes from p, the upper half zero.
inline __m512i load_half(const uint8_t* p) { return _mm512_maskz_loadu_epi8(__mmask64(0xFFFFFFFFull), p); }

struct Sums {
  // int16 lane t < 16: the sum of code 2t; lane 16 + t: that of code 2t + 1
  using Block = __m512i;

  static constexpr int kQueriesPerPass = 4;

  template <int kQueries>
  [[gnu::always_inline]] static inline void add_pairs(__m512i words, const uint8_t* tables, int64_t stride,
                                                      __m512i (&low_all)[kQueries], __m512i (&low_odd)[kQueries],
                                                      __m512i (&high_all)[kQueries], __m512i (&high_odd)[kQueries],
                                                      bool one_pair) {
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    const __m512i low_words = _mm512_and_si512(words, nibble);
    const __m512i high_words = _mm512_and_si512(_mm512_srli_epi16(words, 4), nibble);
    for (int j = 0; j < kQueries; ++j) {
      const uint8_t* t = tables + j * stride;
      const __m512i lut = one_pair ? load_half(t) : _mm512_loadu_si512(t);
      const __m512i low = _mm512_shuffle_epi8(lut, low_words);
      const __m512i high = _mm512_shuffle_epi8(lut, high_words);
      low_all[j] = _mm512_add_epi16(low_all[j], low);
      low_odd[j] = _mm512_add_epi16(low_odd[j], _mm512_srli_epi16(low, 8));
      high_all[j] = _mm512_add_epi16(high_all[j], high);
      high_odd[j] = _mm512_add_epi16(high_odd[j], _mm512_srli_epi16(high, 8));
    }
  }

  template <int64_t kPairs, int kQueries>
  [[gnu::always_inline]] static inline void block(const uint8_t* codes, const uint8_t* tables, int64_t pairs_runtime,
                                                  Block (&sums)[kQueries]) {
    const int64_t pairs = kPairs > 0 ? kPairs : pairs_runtime;
    const int64_t stride = pairs * 32;  // bytes between two queries' tables
    // int16 lanes: "all" adds (even code + 256 * odd code), "odd" the odd codes alone; 128-bit lane
    // l holds books 4r + l
    __m512i low_all[kQueries], low_odd[kQueries];    // codes 0..15
    __m512i high_all[kQueries], high_odd[kQueries];  // codes 16..31
    for (int j = 0; j < kQueries; ++j)
      low_all[j] = low_odd[j] = high_all[j] = high_odd[j] = _mm512_setzero_si512();
    int64_t p = 0;
    for (; p + 2 <= pairs; p += 2)
      add_pairs<kQueries>(_mm512_loadu_si512(codes + p * 32), tables + p * 32, stride, low_all, low_odd, high_all,
                          high_odd, false);
    if (p < pairs)
      add_pairs<kQueries>(load_half(codes + p * 32), tables + p * 32, stride, low_all, low_odd, high_all, high_odd,
                          true);
    for (int j = 0; j < kQueries; ++j) {
      const __m512i low_even = _mm512_sub_epi16(low_all[j], _mm512_slli_epi16(low_odd[j], 8));
      const __m512i high_even = _mm512_sub_epi16(high_all[j], _mm512_slli_epi16(high_odd[j], 8));
      // [low even, high even, low odd, high odd]: each the sum of its four lanes
      sums[j] = add_lane_pairs(add_lane_pairs(low_even, high_even), add_lane_pairs(low_odd[j], high_odd[j]));
    }
  }

  // Lane t < 16 is code 2t, lane 16 + t code 2t + 1: the compare's halves spread to even and odd bits.
  [[gnu::always_inline]] static inline uint32_t passing(const Block& sums, int16_t threshold16) {
    const uint32_t lanes = _mm512_cmpgt_epi16_mask(sums, _mm512_set1_epi16(threshold16));
    if (lanes == 0) return 0;
    return _pdep_u32(lanes & 0xFFFFu, 0x55555555u) | _pdep_u32(lanes >> 16, 0xAAAAAAAAu);
  }

  static Block load(const int16_t (&rows)[2][16]) { return _mm512_load_si512(rows); }

  static void store(const Block& sums, int16_t (&rows)[2][16]) { _mm512_store_si512(rows, sums); }
};

}  // namespace

void scan4(const uint8_t* tables, int64_t nq, const uint8_t* packed, int64_t pairs, int64_t num_codes,
           int64_t first_block, int64_t end_block, TopK* tops) {
  scan4_with<Sums>(tables, nq, packed, pairs, num_codes, first_block, end_block, tops);
}

}  // namespace opqn::cpu::avx512

#undef OPQN_ISA
#include "cpu/avx512_target_end.h"
#endif
