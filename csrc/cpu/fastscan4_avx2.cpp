// The AVX2 4-bit scanner: per 32 codes and pair of books, one 32-byte load holds all their words;
// two vpshufb look them up in the pair's two 16-entry tables (one per 128-bit lane) at once. The
// looked-up bytes are summed without widening: added as int16 lanes (even code + 256 * odd code)
// and, shifted right by 8, as the odd codes alone; even sums come out by subtraction at the end,
// and the two books' lanes are added by two lane permutes. Two compares per 32 codes against the
// query's threshold (kept as int16 per query); only codes above it reach the heap. Queries go
// two at a time, so each load of words and its nibble masks serves both. Each query's threshold
// starts from a sample of the range (its first 4096 codes) rather than from nothing.
#if defined(__x86_64__) || defined(__i386__)
#include <algorithm>
#include <cstdint>
#include <vector>

#include <immintrin.h>

#include "cpu/fastscan4.h"

#include "cpu/avx2_target_begin.h"

namespace opqn::cpu::avx2 {
namespace {

// The int16 sums of a block's codes as two rows: rows[0][j] of code 2j, rows[1][j] of code 2j+1.
struct BlockSums {
  alignas(32) int16_t rows[2][16];
  BlockSums(__m256i even, __m256i odd) {
    _mm256_store_si256(reinterpret_cast<__m256i*>(rows[0]), even);
    _mm256_store_si256(reinterpret_cast<__m256i*>(rows[1]), odd);
  }
};

// Offers the codes of a 32-code block that passed: even[j] holds the sum of code 2j, odd[j] that
// of code 2j+1; the masks have two bits per lane (movemasks of int16 compares).
void offer_block(__m256i even, __m256i odd, uint32_t even_mask, uint32_t odd_mask, int64_t first_id,
                 int64_t num_codes, TopK& top) {
  const BlockSums sums(even, odd);
  uint32_t mask = (even_mask & 0x55555555u) | (odd_mask & 0xAAAAAAAAu);  // bit 2j: even, 2j+1: odd
  while (mask != 0) {
    const int bit = __builtin_ctz(mask);
    mask &= mask - 1;
    const int j = bit / 2, odd_code = bit % 2;
    const int64_t id = first_id + 2 * j + odd_code;
    if (id >= num_codes) continue;
    const float s = static_cast<float>(sums.rows[odd_code][j]);
    if (s > top.threshold) topk_offer(top, s, id);
  }
}

constexpr int64_t kPrefetchBlocks = 16;  // blocks ahead of the scan (reads past the end are harmless)

// Sums are 0..32767 and a threshold an integer or -inf: int16 compares are exact.
int16_t threshold_of(const TopK& top) {
  return top.threshold < 0.0f ? int16_t(-1) : static_cast<int16_t>(top.threshold);
}

// Adds the two 128-bit lanes (books 2p and 2p+1 of the same codes) of x and of y: [x sums, y sums].
__m256i add_lanes(__m256i x, __m256i y) {
  return _mm256_add_epi16(_mm256_permute2x128_si256(x, y, 0x20), _mm256_permute2x128_si256(x, y, 0x31));
}

// The int16 sums of one block's 32 codes for kQueries queries at once (their tables kQueries * pairs
// * 32 bytes apart), so that each 32-byte load of words and its two nibble masks serve them all:
// even[j][i] = sum of code 2i, odd[j][i] = sum of code 2i + 1 (codes 0..15 in lanes 0-7, 16..31 in
// 8-15), for query j.
template <int64_t kPairs, int kQueries>
[[gnu::always_inline]] inline void block_sums(const uint8_t* codes, const uint8_t* tables, int64_t pairs_runtime,
                                              __m256i (&even)[kQueries], __m256i (&odd)[kQueries]) {
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
    even[j] = add_lanes(_mm256_sub_epi16(low_all[j], _mm256_slli_epi16(low_odd[j], 8)),
                        _mm256_sub_epi16(high_all[j], _mm256_slli_epi16(high_odd[j], 8)));
    odd[j] = add_lanes(low_odd[j], high_odd[j]);
  }
}

// Compares a block's sums for query q with its threshold; offers the codes above it.
[[gnu::always_inline]] inline void compare_and_offer(__m256i even, __m256i odd, int64_t first_id, int64_t num_codes,
                                                     int16_t& threshold16, TopK& top) {
  const __m256i threshold = _mm256_set1_epi16(threshold16);
  const __m256i even_pass = _mm256_cmpgt_epi16(even, threshold);
  const __m256i odd_pass = _mm256_cmpgt_epi16(odd, threshold);
  const __m256i pass = _mm256_or_si256(even_pass, odd_pass);
  if (_mm256_testz_si256(pass, pass)) return;
  offer_block(even, odd, _mm256_movemask_epi8(even_pass), _mm256_movemask_epi8(odd_pass), first_id, num_codes,
              top);
  threshold16 = threshold_of(top);
}

constexpr int64_t kSampleBlocks = 128;  // 4096 codes: where a query's first threshold comes from

// A first threshold for query q (its tables at `tables`) from the sample blocks [first_block,
// first_block + kSampleBlocks), which must hold no missing code: the largest t, a multiple of 8,
// such that at least k of their codes score t or more, minus 1 (-1 where fewer than k do). The final
// k-th best score of the range can only be higher, so starting the scan there drops no code that
// belongs, and spares the reservoir the offers of a threshold that starts at nothing.
int sample_threshold(const uint8_t* tables, const uint8_t* packed, int64_t pairs, int64_t first_block, int64_t k) {
  constexpr int kBinShift = 3;
  uint16_t bins[32768 >> kBinShift] = {};  // counts of scores >> kBinShift; sums are 0..32767
  int top_bin = 0;
  for (int64_t block = first_block; block < first_block + kSampleBlocks; ++block) {
    __m256i even[1], odd[1];
    block_sums<0, 1>(packed + block * pairs * 32, tables, pairs, even, odd);
    const BlockSums sums(even[0], odd[0]);
    for (const int16_t* row : sums.rows) {
      for (int j = 0; j < 16; ++j) {
        const int bin = row[j] >> kBinShift;
        ++bins[bin];
        top_bin = std::max(top_bin, bin);
      }
    }
  }
  int64_t at_least = 0;  // codes of the sample in bins [bin, top_bin]
  for (int bin = top_bin; bin >= 0; --bin) {
    at_least += bins[bin];
    if (at_least >= k) return (bin << kBinShift) - 1;
  }
  return -1;
}

// kPairs > 0: the number of book pairs as a compile-time constant (the loop over them unrolls).
// Queries go two at a time (block_sums), an odd last one alone. Where the range is long and k a
// small share of a sample, each query starts from the sample's threshold (sample_threshold).
template <int64_t kPairs>
void scan4_pairs(const uint8_t* tables, int64_t nq, const uint8_t* packed, int64_t pairs_runtime,
                 int64_t num_codes, int64_t first_block, int64_t end_block, TopK* tops) {
  const int64_t pairs = kPairs > 0 ? kPairs : pairs_runtime;
  std::vector<int16_t> thresholds(static_cast<size_t>(nq));  // tops[q].threshold as int16
  // the sample holds no missing code: missing ones exist only in the last block of all
  const bool sampled = end_block - first_block >= 4 * kSampleBlocks && nq > 0 &&
                       4 * tops[0].k <= kSampleBlocks * kBlockCodes4;
  for (int64_t q = 0; q < nq; ++q) {
    if (sampled) {
      const int floor = sample_threshold(tables + q * pairs * 32, packed, pairs, first_block, tops[q].k);
      if (floor >= 0) topk_set_floor(tops[q], static_cast<float>(floor));
    }
    thresholds[q] = threshold_of(tops[q]);
  }
  for (int64_t block = first_block; block < end_block; ++block) {
    const uint8_t* codes = packed + block * pairs * 32;
    const int64_t first_id = block * kBlockCodes4;
    for (int64_t line = 0; line < pairs * 32; line += 64)
      _mm_prefetch(reinterpret_cast<const char*>(codes + kPrefetchBlocks * pairs * 32 + line), _MM_HINT_T0);
    int64_t q = 0;
    for (; q + 2 <= nq; q += 2) {
      __m256i even[2], odd[2];
      block_sums<kPairs, 2>(codes, tables + q * pairs * 32, pairs, even, odd);
      compare_and_offer(even[0], odd[0], first_id, num_codes, thresholds[q], tops[q]);
      compare_and_offer(even[1], odd[1], first_id, num_codes, thresholds[q + 1], tops[q + 1]);
    }
    if (q < nq) {
      __m256i even[1], odd[1];
      block_sums<kPairs, 1>(codes, tables + q * pairs * 32, pairs, even, odd);
      compare_and_offer(even[0], odd[0], first_id, num_codes, thresholds[q], tops[q]);
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
