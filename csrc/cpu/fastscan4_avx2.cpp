// The AVX2 4-bit scanner: per 32 codes and pair of books, one 32-byte load holds all their words;
// two vpshufb look them up in the pair's two 16-entry tables (one per 128-bit lane) at once. The
// looked-up bytes are summed without widening: added as int16 lanes (even code + 256 * odd code)
// and, shifted right by 8, as the odd codes alone; even sums come out by subtraction at the end,
// and the two books' lanes are added by two lane permutes. Queries go two at a time (16 vector
// registers), so each load of words and its nibble masks serves both. The scan loop around the
// sums is fastscan4_scan.h.
#if defined(__x86_64__) || defined(__i386__)
#include <algorithm>
#include <cstdint>
#include <vector>

#include <immintrin.h>

#include "cpu/fastscan4.h"

#include "cpu/avx2_target_begin.h"

#define OPQN_ISA avx2
#include "cpu/fastscan4_scan.h"

namespace opqn::cpu::avx2 {
namespace {

// Adds the two 128-bit lanes (books 2p and 2p+1 of the same codes) of x and of y: [x sums, y sums].
inline __m256i add_lanes(__m256i x, __m256i y) {
  return _mm256_add_epi16(_mm256_permute2x128_si256(x, y, 0x20), _mm256_permute2x128_si256(x, y, 0x31));
}

struct Sums {
  // even[i] = the sum of code 2i, odd[i] that of code 2i + 1
  struct Block {
    __m256i even, odd;
  };

  static constexpr int kQueriesPerPass = 2;

  template <int64_t kPairs, int kQueries>
  [[gnu::always_inline]] static inline void block(const uint8_t* codes, const uint8_t* tables, int64_t pairs_runtime,
                                                  Block (&sums)[kQueries]) {
    const int64_t pairs = kPairs > 0 ? kPairs : pairs_runtime;
    const __m256i nibble = _mm256_set1_epi8(0x0F);
    // int16 lanes: "all" adds (even code + 256 * odd code), "odd" the odd codes alone
    __m256i low_all[kQueries], low_odd[kQueries];    // codes 0..15
    __m256i high_all[kQueries], high_odd[kQueries];  // codes 16..31
    for (int j = 0; j < kQueries; ++j)
      low_all[j] = low_odd[j] = high_all[j] = high_odd[j] = _mm256_setzero_si256();
    for (int64_t p = 0; p < pairs; ++p) {
      const __m256i words = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + p * 32));
      const __m256i low_words = _mm256_and_si256(words, nibble);
      const __m256i high_words = _mm256_and_si256(_mm256_srli_epi16(words, 4), nibble);
      for (int j = 0; j < kQueries; ++j) {
        const __m256i lut = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tables + (j * pairs + p) * 32));
        const __m256i low = _mm256_shuffle_epi8(lut, low_words);
        const __m256i high = _mm256_shuffle_epi8(lut, high_words);
        low_all[j] = _mm256_add_epi16(low_all[j], low);
        low_odd[j] = _mm256_add_epi16(low_odd[j], _mm256_srli_epi16(low, 8));
        high_all[j] = _mm256_add_epi16(high_all[j], high);
        high_odd[j] = _mm256_add_epi16(high_odd[j], _mm256_srli_epi16(high, 8));
      }
    }
    for (int j = 0; j < kQueries; ++j) {
      sums[j].even = add_lanes(_mm256_sub_epi16(low_all[j], _mm256_slli_epi16(low_odd[j], 8)),
                               _mm256_sub_epi16(high_all[j], _mm256_slli_epi16(high_odd[j], 8)));
      sums[j].odd = add_lanes(low_odd[j], high_odd[j]);
    }
  }

  // Movemasks of int16 compares have two bits per lane: bit 2i of the even ones is code 2i, bit
  // 2i + 1 of the odd ones code 2i + 1.
  [[gnu::always_inline]] static inline uint32_t passing(const Block& sums, int16_t threshold16) {
    const __m256i threshold = _mm256_set1_epi16(threshold16);
    const __m256i even_pass = _mm256_cmpgt_epi16(sums.even, threshold);
    const __m256i odd_pass = _mm256_cmpgt_epi16(sums.odd, threshold);
    const __m256i pass = _mm256_or_si256(even_pass, odd_pass);
    if (_mm256_testz_si256(pass, pass)) return 0;
    return (static_cast<uint32_t>(_mm256_movemask_epi8(even_pass)) & 0x55555555u) |
           (static_cast<uint32_t>(_mm256_movemask_epi8(odd_pass)) & 0xAAAAAAAAu);
  }

  static Block load(const int16_t (&rows)[2][16]) {
    return {_mm256_load_si256(reinterpret_cast<const __m256i*>(rows[0])),
            _mm256_load_si256(reinterpret_cast<const __m256i*>(rows[1]))};
  }

  static void store(const Block& sums, int16_t (&rows)[2][16]) {
    _mm256_store_si256(reinterpret_cast<__m256i*>(rows[0]), sums.even);
    _mm256_store_si256(reinterpret_cast<__m256i*>(rows[1]), sums.odd);
  }
};

}  // namespace

void scan4(const uint8_t* tables, int64_t nq, const uint8_t* packed, int64_t pairs, int64_t num_codes,
           int64_t first_block, int64_t end_block, TopK* tops) {
  scan4_with<Sums>(tables, nq, packed, pairs, num_codes, first_block, end_block, tops);
}

}  // namespace opqn::cpu::avx2

#undef OPQN_ISA
#include "cpu/avx2_target_end.h"
#endif
