// ADC scanners: score codes against padded lookup tables and offer them to per-query top-k heaps.
// One implementation per instruction set (adc_scan_scalar.cpp, adc_scan_avx2.cpp,
// adc_scan_avx512.cpp), chosen by adc_scanner() for the active ISA (cpu_isa.h). Tables are padded
// to 256 entries per book, so no uint8 code can index outside them; every path adds a code's M
// entries in book order, so all paths give bit-identical scores.
#pragma once

#include <cstdint>

#include "cpu/topk_heap.h"

namespace opqn::cpu {

constexpr int64_t kLutStride = 256;  // entries per book in a padded table

// The interleaved-table scan (adc_interleaved_scan.h): its int16 byte sums hold up to 128 books;
// queries per group on AVX2 and AVX-512.
constexpr int64_t kInterleavedMaxBooks = 32767 / 255;
constexpr int64_t kInterleavedLanesAvx2 = 16;
constexpr int64_t kInterleavedLanesAvx512 = 32;

// luts: [nq, M, 256]; codes: [N, M]; offers codes [first, end) of every query q to tops[q].
using AdcScanFn = void (*)(const float* luts, int64_t nq, const uint8_t* codes, int64_t N,
                           int64_t M, int64_t first, int64_t end, TopK* tops);

namespace scalar {
void adc_scan(const float* luts, int64_t nq, const uint8_t* codes, int64_t N, int64_t M,
              int64_t first, int64_t end, TopK* tops);
}
namespace avx2 {
void adc_scan(const float* luts, int64_t nq, const uint8_t* codes, int64_t N, int64_t M,
              int64_t first, int64_t end, TopK* tops);
}
namespace avx512 {
void adc_scan(const float* luts, int64_t nq, const uint8_t* codes, int64_t N, int64_t M,
              int64_t first, int64_t end, TopK* tops);
}

AdcScanFn adc_scanner();

// How many queries the active scanner handles at the cost of one, for M books (search_topk's
// query_granule): the groups of its interleaved tables, 1 where it scans each query alone.
int64_t adc_query_granule(int64_t M);

}  // namespace opqn::cpu
