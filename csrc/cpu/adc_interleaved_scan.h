// The interleaved-table ADC scan shared by the AVX2 and AVX-512 scanners: the exact filter of
// adc_filter.h for a group of queries at once, one query per int16 lane (Lanes::kLanes of them).
// The group's byte tables are interleaved: row [m, w] holds the group's bytes of entry (m, w), so
// one load of a row widened to int16 lanes gives that entry for every query of the group, and a
// code's M rows summed give all their byte sums: one table load per code and book instead of one
// per code, book and query. The sums are compared with the group's byte thresholds at once; only
// the queries that a code passes score it in float, entries added in book order as the scalar
// scanner does, and offer it when it beats their top-k threshold. The byte thresholds are
// conservative (adc_filter.h), so every code that a float scan would offer is offered, in the same
// id order: results are bit-identical to the other paths.
//
// A Lanes policy has kLanes; kMaskBitsPerLane (bits per lane in a pass mask); Vec; zero();
// add_row(sums, row): sums plus the kLanes bytes at row widened to int16; load(thresholds[kLanes]);
// passing(sums, thresholds): a mask with bit kMaskBitsPerLane * l set where lane l's sum is above
// its threshold (and no bits of other lanes).
//
// Include only from adc_scan_<isa>.cpp, after its target_begin header, with OPQN_ISA defined (the
// namespace of that build); that file includes the headers below before its target_begin header,
// so that none of their inline code is built for the target. Everything here has internal linkage.
#ifndef OPQN_ISA
#error "define OPQN_ISA before including adc_interleaved_scan.h"
#endif

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/adc_filter.h"
#include "cpu/adc_scan.h"

namespace opqn::cpu::OPQN_ISA {
namespace {

constexpr int64_t kInterleavedBlockCodes = 2048;       // codes scanned by every group before the next block
constexpr int64_t kInterleavedChunkGroups = 8;         // groups whose tables are built at once
constexpr int16_t kNeverPasses = 32767;                // threshold of an empty lane: no sum exceeds it

// The groups' interleaved byte tables, [groups, M, 256, lanes] (missing queries' lanes zero), from
// the filter tables [nq, M, 256].
std::vector<uint8_t> interleave(const FilterTables& tables, int64_t nq, int64_t lanes) {
  const int64_t M = tables.M, groups = (nq + lanes - 1) / lanes;
  std::vector<uint8_t> rows(static_cast<size_t>(groups * M * 256 * lanes), 0);
  for (int64_t q = 0; q < nq; ++q) {
    const uint8_t* bytes = tables.bytes.data() + q * M * 256;
    uint8_t* column = rows.data() + (q / lanes) * M * 256 * lanes + q % lanes;
    for (int64_t e = 0; e < M * 256; ++e) column[e * lanes] = bytes[e];
  }
  return rows;
}

template <int64_t kM>
float exact_score(const float* lut, const uint8_t* code, int64_t m_runtime) {
  const int64_t M = kM > 0 ? kM : m_runtime;
  float s = 0.0f;
  for (int64_t m = 0; m < M; ++m) s += lut[m * kLutStride + code[m]];
  return s;
}

// Codes [b0, b1) for the queries q0, q0 + 1, ... of one group: rows = its interleaved tables,
// thresholds = its byte thresholds (kNeverPasses in empty lanes; kept up to date with tops).
template <class Lanes, int64_t kM>
void scan_group(const uint8_t* rows, const float* luts, const FilterTables& tables, int64_t q0, const uint8_t* codes,
                int64_t m_runtime, int64_t b0, int64_t b1, int16_t* thresholds, TopK* tops) {
  const int64_t M = kM > 0 ? kM : m_runtime;
  typename Lanes::Vec threshold = Lanes::load(thresholds);
  for (int64_t i = b0; i < b1; ++i) {
    const uint8_t* code = codes + i * M;
    typename Lanes::Vec sums = Lanes::zero();
    for (int64_t m = 0; m < M; ++m) sums = Lanes::add_row(sums, rows + (m * 256 + code[m]) * Lanes::kLanes);
    auto mask = Lanes::passing(sums, threshold);
    if (mask == 0) continue;  // the common case: no lane passes, the thresholds stay
    while (mask != 0) {
      const int64_t lane = __builtin_ctzll(mask) / Lanes::kMaskBitsPerLane;
      mask &= mask - 1;
      TopK& top = tops[lane];
      const float s = exact_score<kM>(luts + lane * M * kLutStride, code, M);
      if (!(s > top.threshold)) continue;
      const float before = top.threshold;  // it changes when the reservoir is compacted
      topk_offer(top, s, i);
      if (top.threshold != before) thresholds[lane] = threshold_bytes(tables, q0 + lane, top.threshold);
    }
    threshold = Lanes::load(thresholds);
  }
}

// Queries [0, nq) in chunks of kInterleavedChunkGroups groups, each chunk over the whole range, so
// that the tables of one call stay bounded however many queries it has.
template <class Lanes, int64_t kM>
void scan_interleaved_books(const float* luts, int64_t nq, const uint8_t* codes, int64_t M, int64_t first,
                            int64_t end, TopK* tops) {
  constexpr int64_t kLanes = Lanes::kLanes;
  FilterTables tables;
  std::vector<int16_t> thresholds;  // [groups, lanes]
  for (int64_t c0 = 0; c0 < nq; c0 += kInterleavedChunkGroups * kLanes) {
    const int64_t n = std::min(kInterleavedChunkGroups * kLanes, nq - c0);
    const float* chunk_luts = luts + c0 * M * kLutStride;
    build_filter_tables(chunk_luts, n, M, tables);
    const std::vector<uint8_t> rows = interleave(tables, n, kLanes);
    const int64_t groups = (n + kLanes - 1) / kLanes;
    thresholds.assign(static_cast<size_t>(groups * kLanes), kNeverPasses);
    for (int64_t q = 0; q < n; ++q) thresholds[q] = threshold_bytes(tables, q, tops[c0 + q].threshold);
    for (int64_t b0 = first; b0 < end; b0 += kInterleavedBlockCodes) {
      const int64_t b1 = std::min(end, b0 + kInterleavedBlockCodes);
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t q0 = g * kLanes;
        scan_group<Lanes, kM>(rows.data() + g * M * 256 * kLanes, chunk_luts + q0 * M * kLutStride, tables, q0,
                              codes, M, b0, b1, thresholds.data() + q0, tops + c0 + q0);
      }
    }
  }
}

// adc_scan (adc_scan.h) by interleaved tables; M <= kInterleavedMaxBooks.
template <class Lanes>
void scan_interleaved(const float* luts, int64_t nq, const uint8_t* codes, int64_t M, int64_t first, int64_t end,
                      TopK* tops) {
  switch (M) {
    case 4: return scan_interleaved_books<Lanes, 4>(luts, nq, codes, M, first, end, tops);
    case 8: return scan_interleaved_books<Lanes, 8>(luts, nq, codes, M, first, end, tops);
    case 16: return scan_interleaved_books<Lanes, 16>(luts, nq, codes, M, first, end, tops);
    case 32: return scan_interleaved_books<Lanes, 32>(luts, nq, codes, M, first, end, tops);
    default: return scan_interleaved_books<Lanes, 0>(luts, nq, codes, M, first, end, tops);
  }
}

}  // namespace
}  // namespace opqn::cpu::OPQN_ISA
