// The 4-bit scan loop shared by the AVX2 and AVX-512 scanners, generic over how a block's sums are
// computed (a `Sums` policy, below). Per block of 32 codes: the int16 sums of every query (a group
// of Sums::kQueriesPerPass queries per pass, so that each load of words serves them all). A part
// of the database is searched in one of two ways (use_selection):
// - the reservoir scan: each block's sums compared with each query's threshold (kept as int16) in
//   one or two instructions, only codes above it offered to the top-k reservoir; each query's
//   threshold starts from a sample of the part (its first 4096 codes) rather than from nothing;
// - selection, for short parts: every sum of a group of queries stored, then each query's best
//   codes picked from its sums (offer_best), with no reservoir compactions.
// Both keep the same codes: the best in result order (sum descending, then smaller id).
//
// A Sums policy has
// - `Block`: the 32 int16 sums of one block for one query, in registers;
// - `static constexpr int kQueriesPerPass` (a power of two);
// - `template <int64_t kPairs, int kQueries> static void block(codes, tables, pairs, sums)`: the
//   Blocks of kQueries queries (tables pairs * 32 bytes apart), sums[j] of query j; kPairs > 0 is
//   the number of book pairs as a compile-time constant (the loop over them unrolls);
// - `static uint32_t passing(const Block&, int16_t threshold)`: bit c set where code c's sum is
//   above the threshold;
// - `static void store(const Block&, int16_t (&rows)[2][16])`: rows[c % 2][c / 2] = code c's sum
//   (rows 64-byte aligned), and `static Block load(const int16_t (&rows)[2][16])` its inverse.
//
// Include only from fastscan4_<isa>.cpp, after its target_begin header, with OPQN_ISA defined (the
// namespace of that build); that file includes the headers below before its target_begin header,
// so that none of their inline code is built for the target. Everything here has internal linkage.
#ifndef OPQN_ISA
#error "define OPQN_ISA before including fastscan4_scan.h"
#endif

#include <algorithm>
#include <cstdint>
#include <vector>

#include <immintrin.h>

#include "cpu/fastscan4.h"

namespace opqn::cpu::OPQN_ISA {
namespace {

// The int16 sums of a block's codes as two rows: rows[c % 2][c / 2] = the sum of code c.
template <class Sums>
struct BlockRows {
  alignas(64) int16_t rows[2][16];
  explicit BlockRows(const typename Sums::Block& sums) { Sums::store(sums, rows); }
};

// Offers the codes of a 32-code block that passed (bit c of mask: code c).
template <class Sums>
void offer_block(const typename Sums::Block& sums, uint32_t mask, int64_t first_id, int64_t num_codes, TopK& top) {
  const BlockRows<Sums> block(sums);
  while (mask != 0) {
    const int c = __builtin_ctz(mask);
    mask &= mask - 1;
    const int64_t id = first_id + c;
    if (id >= num_codes) continue;
    const float s = static_cast<float>(block.rows[c % 2][c / 2]);
    if (s > top.threshold) topk_offer(top, s, id);
  }
}

constexpr int64_t kPrefetchBlocks = 16;  // blocks ahead of the scan (reads past the end are harmless)

// Sums are 0..32767 and a threshold an integer or -inf: int16 compares are exact.
int16_t threshold_of(const TopK& top) {
  return top.threshold < 0.0f ? int16_t(-1) : static_cast<int16_t>(top.threshold);
}

// Compares a block's sums for one query with its threshold; offers the codes above it.
template <class Sums>
[[gnu::always_inline]] inline void compare_and_offer(const typename Sums::Block& sums, int64_t first_id,
                                                     int64_t num_codes, int16_t& threshold16, TopK& top) {
  const uint32_t mask = Sums::passing(sums, threshold16);
  if (mask == 0) return;
  offer_block<Sums>(sums, mask, first_id, num_codes, top);
  threshold16 = threshold_of(top);
}

// How many of sums [n] (n a multiple of 32, at most 32767 * 32) are at least t: int16 counts per
// lane of 32, in loops the compiler vectorizes.
inline int64_t count_at_least(const int16_t* sums, int64_t n, int16_t t) {
  alignas(64) int16_t lanes[kBlockCodes4] = {};
  for (int64_t i = 0; i < n; i += kBlockCodes4)
    for (int64_t j = 0; j < kBlockCodes4; ++j) lanes[j] += sums[i + j] >= t;
  int64_t count = 0;
  for (const int16_t lane : lanes) count += lane;
  return count;
}

// The k-th largest of sums [n] (as count_at_least), or 0 where fewer than k are 1 or more: a binary
// search on count_at_least between 0 and their maximum (a reduction the compiler vectorizes, unlike
// std::max_element's index).
inline int kth_largest(const int16_t* sums, int64_t n, int64_t k) {
  int16_t top = 0;
  for (int64_t i = 0; i < n; ++i) top = std::max(top, sums[i]);
  int lo = 0, hi = top;  // the answer lies in [lo, hi]; any lo > 0 has count_at_least(lo) >= k
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (count_at_least(sums, n, static_cast<int16_t>(mid)) >= k)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

// The sums of kQueries queries (tables pairs * 32 bytes apart) for blocks [first_block, end_block),
// stored as BlockRows block after block: query j's at out + j * stride.
template <class Sums, int64_t kPairs, int kQueries>
void store_sums(const uint8_t* tables, const uint8_t* packed, int64_t pairs, int64_t first_block, int64_t end_block,
                int16_t* out, int64_t stride) {
  for (int64_t block = first_block; block < end_block; ++block) {
    typename Sums::Block sums[kQueries];
    Sums::template block<kPairs, kQueries>(packed + block * pairs * 32, tables, pairs, sums);
    for (int j = 0; j < kQueries; ++j)
      Sums::store(sums[j], *reinterpret_cast<int16_t(*)[2][16]>(out + j * stride + (block - first_block) * 32));
  }
}

constexpr int64_t kSampleBlocks = 128;  // 4096 codes: where a query's first threshold comes from
constexpr int64_t kSampleCodes = kSampleBlocks * kBlockCodes4;

// A first threshold for query q (its tables at `tables`) from the sample blocks [first_block,
// first_block + kSampleBlocks), which must hold no missing code and at least k codes: the k-th
// largest sum of the sample minus 1 (-1 where that is 0). The final k-th best score of the range
// can only be higher, so starting the scan there drops no code that belongs, and spares the
// reservoir the offers of a threshold that starts at nothing.
template <class Sums>
int sample_threshold(const uint8_t* tables, const uint8_t* packed, int64_t pairs, int64_t first_block, int64_t k) {
  alignas(64) int16_t sums[kSampleCodes];
  store_sums<Sums, 0, 1>(tables, packed, pairs, first_block, first_block + kSampleBlocks, sums, 0);
  return kth_largest(sums, kSampleCodes, k) - 1;
}

// Which search a part of `blocks` blocks gets, for k candidates a query: selection (select_groups)
// costs a few passes over the stored sums whatever k is, the reservoir scan's offers and
// compactions grow with k and, more slowly, with the part. Measured (1 thread, 100 queries,
// AVX-512 and AVX2): selection is faster wherever k >= 20, and for k = 2 in parts under 1024
// blocks, but 5-20% slower for k = 2 in longer ones. Parts longer than kSelectMaxBlocks always take
// the reservoir: selection's stored sums (kQueriesPerPass * blocks * 64 bytes) stay under 1 MB, and
// int16 counts per lane hold their number.
constexpr int64_t kSelectMaxBlocks = 4096;  // 131072 codes
static_assert(kSelectMaxBlocks <= 32767);

inline bool use_selection(int64_t blocks, int64_t k) {
  return blocks <= kSelectMaxBlocks && (blocks < 1024 || k >= 8);
}

// Scratch of offer_best, kept across the queries of a scan.
struct SelectScratch {
  std::vector<int16_t> sample;      // sums of every kSelectSampleStride-th block
  std::vector<int16_t> candidates;  // sums of the codes at or above the floor, padded with -1
  std::vector<int32_t> positions;   // their positions (block * 32 + code) in the part
};

constexpr int64_t kSelectSampleStride = 8;

// The cut of the best k of some sums: every sum above kth is among them, and the first `ties` of
// those equal to kth (in id order).
struct BestCut {
  int kth;
  int64_t ties;

  // sums [n]: as count_at_least
  BestCut(const int16_t* sums, int64_t n, int64_t k)
      : kth(kth_largest(sums, n, k)), ties(k - count_at_least(sums, n, static_cast<int16_t>(kth + 1))) {}

  // Offers code `id` of sum `sum` (at least kth) if it is among the best k.
  void offer(int16_t sum, int64_t id, TopK& top) {
    if (sum == kth && ties-- <= 0) return;
    topk_offer(top, static_cast<float>(sum), id);
  }
};

// fn(sum, position) for each code of the stored sums [blocks * 32] whose sum is at least `least`,
// in id order (position: block * 32 + code).
template <class Sums, class Fn>
void for_each_at_least(const int16_t* sums, int64_t blocks, int least, Fn&& fn) {
  for (int64_t block = 0; block < blocks; ++block) {
    const int16_t(&rows)[2][16] = *reinterpret_cast<const int16_t(*)[2][16]>(sums + block * kBlockCodes4);
    uint32_t mask = Sums::passing(Sums::load(rows), static_cast<int16_t>(least - 1));
    while (mask != 0) {
      const int c = __builtin_ctz(mask);
      mask &= mask - 1;
      fn(rows[c % 2][c / 2], block * kBlockCodes4 + c);
    }
  }
}

// Offers query top's best top.k codes of the stored sums [blocks * 32] of blocks from first_block
// (missing codes' sums -1): the codes above the k-th largest sum, then as many of those equal to it
// as are needed, smallest ids first; exactly what a scan by increasing id would keep.
// Finding the k-th largest sum by kth_largest over every sum takes a dozen passes over them. So
// first a floor is taken from a sample (every kSelectSampleStride-th block): the sum that 2k / n of
// the sample, and 8 codes more, reach. In one pass the codes at or above it are collected with
// their positions; where at least k were (nearly always), the best k are among them, and the
// k-th largest is found among those few. Otherwise, or where the sample is small, every sum is
// searched. (Sums are at most 32766, an even number of books times at most 32767 / that number:
// kth + 1 fits in int16.)
template <class Sums>
void offer_best(const int16_t* sums, int64_t blocks, int64_t first_block, TopK& top, SelectScratch& scratch) {
  const int64_t n = blocks * kBlockCodes4, k = top.k, first_id = first_block * kBlockCodes4;
  const int64_t sample_blocks = blocks / kSelectSampleStride, sample_n = sample_blocks * kBlockCodes4;
  const int64_t rank = sample_n > 0 ? 2 * k * sample_n / n + 8 : 0;
  if (sample_blocks >= 8 && 4 * rank <= sample_n) {
    scratch.sample.resize(static_cast<size_t>(sample_n));
    for (int64_t b = 0; b < sample_blocks; ++b)
      std::copy_n(sums + b * kSelectSampleStride * kBlockCodes4, kBlockCodes4, scratch.sample.data() + b * kBlockCodes4);
    const int floor = kth_largest(scratch.sample.data(), sample_n, rank);
    scratch.candidates.clear();
    scratch.positions.clear();
    for_each_at_least<Sums>(sums, blocks, floor, [&](int16_t sum, int64_t position) {
      scratch.candidates.push_back(sum);
      scratch.positions.push_back(static_cast<int32_t>(position));
    });
    const int64_t found = static_cast<int64_t>(scratch.candidates.size());
    if (found >= k) {
      scratch.candidates.resize(static_cast<size_t>((found + kBlockCodes4 - 1) / kBlockCodes4 * kBlockCodes4), -1);
      const int16_t* found_sums = scratch.candidates.data();
      BestCut cut(found_sums, static_cast<int64_t>(scratch.candidates.size()), k);
      for (int64_t i = 0; i < found; ++i)
        if (found_sums[i] >= cut.kth) cut.offer(found_sums[i], first_id + scratch.positions[i], top);
      return;
    }
  }
  BestCut cut(sums, n, k);
  for_each_at_least<Sums>(sums, blocks, cut.kth, [&](int16_t sum, int64_t position) {
    cut.offer(sum, first_id + position, top);
  });
}

// Selection for short ranges: per group of queries, every code's sum is stored, then each query's
// best codes are found in its sums (offer_best) without passing through the reservoir.
template <class Sums, int64_t kPairs, int kQueries>
void select_groups(const uint8_t* tables, int64_t q, int64_t nq, const uint8_t* packed, int64_t pairs,
                   int64_t num_codes, int64_t first_block, int64_t end_block, TopK* tops, int16_t* sums,
                   SelectScratch& scratch) {
  const int64_t blocks = end_block - first_block, stride = blocks * kBlockCodes4;
  for (; q + kQueries <= nq; q += kQueries) {
    store_sums<Sums, kPairs, kQueries>(tables + q * pairs * 32, packed, pairs, first_block, end_block, sums, stride);
    for (int j = 0; j < kQueries; ++j) {
      int16_t* query_sums = sums + j * stride;
      // missing codes, only in the last block of all
      int16_t(&last)[2][16] = *reinterpret_cast<int16_t(*)[2][16]>(query_sums + stride - kBlockCodes4);
      for (int64_t c = num_codes - (end_block - 1) * kBlockCodes4; c < kBlockCodes4; ++c) last[c % 2][c / 2] = -1;
      offer_best<Sums>(query_sums, blocks, first_block, tops[q + j], scratch);
    }
  }
  if constexpr (kQueries > 1)
    select_groups<Sums, kPairs, kQueries / 2>(tables, q, nq, packed, pairs, num_codes, first_block, end_block, tops,
                                              sums, scratch);
}

// One block for queries [q, nq): groups of kQueries, the rest in groups half as large.
template <class Sums, int64_t kPairs, int kQueries>
[[gnu::always_inline]] inline void scan_block(const uint8_t* codes, const uint8_t* tables, int64_t pairs,
                                              int64_t q, int64_t nq, int64_t first_id, int64_t num_codes,
                                              int16_t* thresholds, TopK* tops) {
  for (; q + kQueries <= nq; q += kQueries) {
    typename Sums::Block sums[kQueries];
    Sums::template block<kPairs, kQueries>(codes, tables + q * pairs * 32, pairs, sums);
    for (int j = 0; j < kQueries; ++j)
      compare_and_offer<Sums>(sums[j], first_id, num_codes, thresholds[q + j], tops[q + j]);
  }
  if constexpr (kQueries > 1)
    scan_block<Sums, kPairs, kQueries / 2>(codes, tables, pairs, q, nq, first_id, num_codes, thresholds, tops);
}

// Selection (select_groups) or the reservoir scan, as use_selection says. In the scan, where the
// range is long and k a small share of a sample, each query starts from the sample's threshold
// (sample_threshold).
template <class Sums, int64_t kPairs>
void scan4_pairs(const uint8_t* tables, int64_t nq, const uint8_t* packed, int64_t pairs_runtime,
                 int64_t num_codes, int64_t first_block, int64_t end_block, TopK* tops) {
  const int64_t pairs = kPairs > 0 ? kPairs : pairs_runtime;
  if (nq > 0 && use_selection(end_block - first_block, tops[0].k)) {
    // the sums of a group of queries, 64-byte aligned
    std::vector<int16_t> buffer(static_cast<size_t>((Sums::kQueriesPerPass * (end_block - first_block) + 1) * 32));
    int16_t* sums = buffer.data() + (64 - reinterpret_cast<uintptr_t>(buffer.data()) % 64) % 64 / sizeof(int16_t);
    SelectScratch scratch;
    select_groups<Sums, kPairs, Sums::kQueriesPerPass>(tables, 0, nq, packed, pairs, num_codes, first_block,
                                                       end_block, tops, sums, scratch);
    return;
  }
  std::vector<int16_t> thresholds(static_cast<size_t>(nq));  // tops[q].threshold as int16
  // the sample holds no missing code: missing ones exist only in the last block of all
  const bool sampled = end_block - first_block >= 4 * kSampleBlocks && nq > 0 &&
                       4 * tops[0].k <= kSampleCodes;
  for (int64_t q = 0; q < nq; ++q) {
    if (sampled) {
      const int floor = sample_threshold<Sums>(tables + q * pairs * 32, packed, pairs, first_block, tops[q].k);
      if (floor >= 0) topk_set_floor(tops[q], static_cast<float>(floor));
    }
    thresholds[q] = threshold_of(tops[q]);
  }
  for (int64_t block = first_block; block < end_block; ++block) {
    const uint8_t* codes = packed + block * pairs * 32;
    for (int64_t line = 0; line < pairs * 32; line += 64)
      _mm_prefetch(reinterpret_cast<const char*>(codes + kPrefetchBlocks * pairs * 32 + line), _MM_HINT_T0);
    scan_block<Sums, kPairs, Sums::kQueriesPerPass>(codes, tables, pairs, 0, nq, block * kBlockCodes4, num_codes,
                                                    thresholds.data(), tops);
  }
}

// scan4 (fastscan4.h) with the common book-pair counts unrolled.
template <class Sums>
void scan4_with(const uint8_t* tables, int64_t nq, const uint8_t* packed, int64_t pairs, int64_t num_codes,
                int64_t first_block, int64_t end_block, TopK* tops) {
  switch (pairs) {
    case 2: return scan4_pairs<Sums, 2>(tables, nq, packed, pairs, num_codes, first_block, end_block, tops);
    case 4: return scan4_pairs<Sums, 4>(tables, nq, packed, pairs, num_codes, first_block, end_block, tops);
    case 8: return scan4_pairs<Sums, 8>(tables, nq, packed, pairs, num_codes, first_block, end_block, tops);
    case 16: return scan4_pairs<Sums, 16>(tables, nq, packed, pairs, num_codes, first_block, end_block, tops);
    default: return scan4_pairs<Sums, 0>(tables, nq, packed, pairs, num_codes, first_block, end_block, tops);
  }
}

}  // namespace
}  // namespace opqn::cpu::OPQN_ISA
