// The AVX2 4-bit scanner: per 32 codes and pair of books, one 32-byte load holds all their words;
// two vpshufb look them up in the pair's two 16-entry tables (one per 128-bit lane) at once. The
// looked-up bytes are summed without widening: added as int16 lanes (even code + 256 * odd code)
// and, shifted right by 8, as the odd codes alone; even sums come out by subtraction at the end.
// One compare per 16 codes against the query's threshold; only codes above it reach the heap.
#if defined(__x86_64__) || defined(__i386__)
#include <cstdint>

#include <immintrin.h>

#include "cpu/fastscan4.h"

#include "cpu/avx2_target_begin.h"

namespace opqn::cpu::avx2 {
namespace {

// Offers the codes of one 16-code group whose sums exceed the threshold; `mask` has two bits per
// code (a movemask of an int16 compare), set where it passed.
void offer_group(__m256i sums, uint32_t mask, int64_t first_id, int64_t num_codes, TopK& top) {
  alignas(32) int16_t s[16];
  _mm256_store_si256(reinterpret_cast<__m256i*>(s), sums);
  mask &= 0x55555555u;
  while (mask != 0) {
    const int j = __builtin_ctz(mask) / 2;
    mask &= mask - 1;
    const int64_t id = first_id + j;
    if (id >= num_codes) break;
    if (static_cast<float>(s[j]) > top.threshold) topk_offer(top, static_cast<float>(s[j]), id);
  }
}

// Sums of 16 codes in order from the even/odd accumulators of one nibble: lane 0 holds book 2p,
// lane 1 book 2p+1 of the same codes.
__m256i code_sums(__m256i all, __m256i odd) {
  const __m256i even = _mm256_sub_epi16(all, _mm256_slli_epi16(odd, 8));
  const __m128i e = _mm_add_epi16(_mm256_castsi256_si128(even), _mm256_extracti128_si256(even, 1));
  const __m128i o = _mm_add_epi16(_mm256_castsi256_si128(odd), _mm256_extracti128_si256(odd, 1));
  return _mm256_set_m128i(_mm_unpackhi_epi16(e, o), _mm_unpacklo_epi16(e, o));
}

__m256i threshold_of(const TopK& top) {
  // Sums are 0..32767 and the threshold an integer or -inf: int16 compares are exact.
  return _mm256_set1_epi16(top.threshold < 0.0f ? int16_t(-1) : static_cast<int16_t>(top.threshold));
}

// kPairs > 0: the number of book pairs as a compile-time constant (the loop over them unrolls).
template <int64_t kPairs>
void scan4_pairs(const uint8_t* tables, int64_t nq, const uint8_t* packed, int64_t pairs_runtime,
                 int64_t num_codes, int64_t first_block, int64_t end_block, TopK* tops) {
  const int64_t pairs = kPairs > 0 ? kPairs : pairs_runtime;
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  for (int64_t block = first_block; block < end_block; ++block) {
    const uint8_t* codes = packed + block * pairs * 32;
    const int64_t first_id = block * kBlockCodes4;
    for (int64_t q = 0; q < nq; ++q) {
      const uint8_t* table = tables + q * pairs * 32;
      __m256i low_all = _mm256_setzero_si256(), low_odd = _mm256_setzero_si256();    // codes 0..15
      __m256i high_all = _mm256_setzero_si256(), high_odd = _mm256_setzero_si256();  // codes 16..31
      for (int64_t p = 0; p < pairs; ++p) {
        const __m256i words = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + p * 32));
        const __m256i lut = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(table + p * 32));
        const __m256i low = _mm256_shuffle_epi8(lut, _mm256_and_si256(words, nibble));
        const __m256i high = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(words, 4), nibble));
        low_all = _mm256_add_epi16(low_all, low);
        low_odd = _mm256_add_epi16(low_odd, _mm256_srli_epi16(low, 8));
        high_all = _mm256_add_epi16(high_all, high);
        high_odd = _mm256_add_epi16(high_odd, _mm256_srli_epi16(high, 8));
      }
      TopK& top = tops[q];
      const __m256i low_sums = code_sums(low_all, low_odd);
      const uint32_t low_mask = _mm256_movemask_epi8(_mm256_cmpgt_epi16(low_sums, threshold_of(top)));
      if (low_mask != 0) offer_group(low_sums, low_mask, first_id, num_codes, top);
      const __m256i high_sums = code_sums(high_all, high_odd);
      const uint32_t high_mask = _mm256_movemask_epi8(_mm256_cmpgt_epi16(high_sums, threshold_of(top)));
      if (high_mask != 0) offer_group(high_sums, high_mask, first_id + 16, num_codes, top);
    }
  }
}

}  // namespace

void scan4(const uint8_t* tables, int64_t nq, const uint8_t* packed, int64_t pairs, int64_t num_codes,
           int64_t first_block, int64_t end_block, TopK* tops) {
  switch (pairs) {
    case 2: return scan4_pairs<2>(tables, nq, packed, pairs, num_codes, first_block, end_block, tops);
    case 4: return scan4_pairs<4>(tables, nq, packed, pairs, num_codes, first_block, end_block, tops);
    case 8: return scan4_pairs<8>(tables, nq, packed, pairs, num_codes, first_block, end_block, tops);
    case 16: return scan4_pairs<16>(tables, nq, packed, pairs, num_codes, first_block, end_block, tops);
    default: return scan4_pairs<0>(tables, nq, packed, pairs, num_codes, first_block, end_block, tops);
  }
}

}  // namespace opqn::cpu::avx2

#include "cpu/avx2_target_end.h"
#endif
