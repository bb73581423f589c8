// The AVX-512 ADC scanner. Groups of 8 or more queries (up to 32 per group) go to the
// interleaved-table scan (adc_interleaved_scan.h), a row of 32 queries' bytes per code and book.
// Fewer queries go to the transposed scan below: a filter on byte tables looked up in registers,
// then exact float scores for the few codes that pass. Per block of codes, each group of 64 codes
// is transposed once into one 64-byte vector per book (byte i = the word of code i), with masked
// byte permutes (VBMI) from the group's M 64-byte windows. Per query, each book's word vector
// indexes the query's byte table (adc_filter.h) held in 1, 2 or 4 registers (vpermb / vpermi2b):
// 64 lookups in one to three instructions. The bytes are summed in int16 lanes without widening
// (even code + 256 * odd code, and the odd codes alone; the even sums come out by subtraction),
// compared with the query's byte threshold, and only codes above it are scored in float, in book
// order as the scalar scanner does, and offered to the top-k when they beat its threshold. The
// byte threshold is conservative (adc_filter.h), so every code that a full float scan would offer
// is offered, in the same id order: results are bit-identical to the other paths. M > 16 with few
// queries goes to the AVX2 scanner, and ranges of at most 2k codes (where every code passes) to the
// scalar one.
#if defined(__x86_64__) || defined(__i386__)
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include <immintrin.h>

#include "cpu/adc_filter.h"
#include "cpu/adc_scan.h"

#include "cpu/avx512_target_begin.h"

#define OPQN_ISA avx512
#include "cpu/adc_interleaved_scan.h"

namespace opqn::cpu::avx512 {
namespace {

constexpr int64_t kGroupCodes = 64;
constexpr int64_t kMaxBooks = 16;      // transposes cost M * M permutes per group
static_assert(kMaxBooks * 255 <= 32767, "byte sums must stay exact in int16 lanes");
constexpr int64_t kBlockGroups = 16;   // 1024 codes transposed per block: [16, M, 64] bytes <= 16 KB
constexpr int64_t kPrefetchCodes = kBlockGroups * kGroupCodes;  // codes read ahead: one block
constexpr int64_t kInterleavedMinQueries = 8;  // from here on (per group) the interleaved tables are faster

// The interleaved-table scan's 32 lanes (adc_interleaved_scan.h): a row of 32 bytes widened by
// vpmovzxbw to one register per code and book.
struct Lanes {
  static constexpr int64_t kLanes = kInterleavedLanesAvx512;
  static constexpr int kMaskBitsPerLane = 1;
  using Vec = __m512i;
  static Vec zero() { return _mm512_setzero_si512(); }
  static Vec add_row(Vec sums, const uint8_t* row) {
    return _mm512_add_epi16(sums, _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row))));
  }
  static Vec load(const int16_t* thresholds) { return _mm512_loadu_si512(thresholds); }
  static uint32_t passing(Vec sums, Vec thresholds) { return _mm512_cmpgt_epi16_mask(sums, thresholds); }
};

// How a group's M 64-byte windows (bytes 64w..64w+63 of its 64 * M) become M word vectors.
// Any M: for book m and window w, which lanes i take their byte from this window (codes whose word
// of book m lies there) and at which offset: M * M masked permutes. M a power of two: log2(M)
// stages of two-register permutes instead (M log2 M in all; see `staged`); each stage pairs registers that hold
// the same books for adjacent code ranges and splits the books between its two outputs, which hold
// them book-major (a book's codes in a row, ascending). The stage-1 inputs are the windows
// themselves, code-major.
struct GroupTranspose {
  alignas(64) uint8_t index[kMaxBooks * kMaxBooks][64];  // [m * M + w]
  __mmask64 lanes[kMaxBooks * kMaxBooks];
  alignas(64) uint8_t stages[4][2][64];  // [stage, low/high books half]: vpermi2b indices
};

// M = 2, 4, 8, 16 take the staged transpose; any other M (1 included) the masked permutes.
constexpr bool staged(int64_t M) { return M >= 2 && (M & (M - 1)) == 0; }

// The staged transposes' vpermi2b indices for M = 2, 4, 8, 16 ([log2 M]): they depend on M alone,
// so they are computed once (their divisions cost a short scan more than its codes).
struct StagedIndices {
  alignas(64) uint8_t stages[5][4][2][64];
};

const StagedIndices& staged_indices() {
  static const StagedIndices indices = [] {
    StagedIndices out{};
    for (int log2_m = 1; log2_m <= 4; ++log2_m) {
      const int64_t M = int64_t(1) << log2_m;
      int stage = 0;
      for (int64_t books_in = M; books_in > 1; books_in /= 2, ++stage) {
        const int64_t books_out = books_in / 2, codes_in = 64 / books_in, codes_out = 2 * codes_in;
        for (int half = 0; half < 2; ++half) {
          for (int64_t p = 0; p < 64; ++p) {
            const int64_t b = p / codes_out + half * books_out, c = p % codes_out;
            const int64_t source = c / codes_in, cc = c % codes_in;  // source 0: first register of the pair
            const int64_t at = books_in == M ? cc * M + b : b * codes_in + cc;
            out.stages[log2_m][stage][half][p] = static_cast<uint8_t>(source * 64 + at);
          }
        }
      }
    }
    return out;
  }();
  return indices;
}

// Fills the half of `plan` that M's transpose uses.
void plan_transpose(int64_t M, GroupTranspose& plan) {
  if (staged(M)) {
    std::memcpy(plan.stages, staged_indices().stages[__builtin_ctzll(static_cast<uint64_t>(M))], sizeof(plan.stages));
    return;
  }
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t w = 0; w < M; ++w) {
      plan.lanes[m * M + w] = 0;
      std::fill(plan.index[m * M + w], plan.index[m * M + w] + 64, uint8_t(0));
    }
    for (int64_t i = 0; i < kGroupCodes; ++i) {
      const int64_t byte = i * M + m, w = byte / 64;
      plan.index[m * M + w][i] = static_cast<uint8_t>(byte % 64);
      plan.lanes[m * M + w] |= __mmask64(1) << i;
    }
  }
}

// Window w of a group of `codes` codes (the bytes past them read as 0, and never from memory).
__m512i load_window(const uint8_t* group, int64_t bytes, int64_t w) {
  const int64_t left = bytes - 64 * w;
  if (left >= 64) return _mm512_loadu_si512(group + 64 * w);
  return _mm512_maskz_loadu_epi8(_bzhi_u64(~uint64_t(0), static_cast<unsigned>(std::max<int64_t>(left, 0))),
                                 group + 64 * w);
}

// The word vector of book m stored to words[m] (byte i: code i's word; missing codes 0), and in
// beyond[m] the lanes whose word lies past the table's first 64 * kRegs entries.
template <int kRegs>
void store_words(__m512i w, int64_t m, uint8_t* words, __mmask64* beyond) {
  _mm512_store_si512(words + m * 64, w);
  beyond[m] = _mm512_test_epi8_mask(w, _mm512_set1_epi8(static_cast<char>(kRegs == 1 ? 0xC0 : 0x80)));
}

// The stages of a power-of-two transpose from `kBooks` books per register down to 1, unrolled so
// that the registers stay registers.
template <int64_t kM, int64_t kBooks>
[[gnu::always_inline]] inline void transpose_stages(__m512i (&r)[kM], const GroupTranspose& plan, int stage) {
  if constexpr (kBooks > 1) {
    const __m512i low = _mm512_load_si512(plan.stages[stage][0]);
    const __m512i high = _mm512_load_si512(plan.stages[stage][1]);
    constexpr int64_t kHalf = kBooks / 2;  // code ranges per book group: kBooks in, kHalf out
    __m512i next[kM];
#pragma GCC unroll 16
    for (int64_t g = 0; g < kM / kBooks; ++g) {
#pragma GCC unroll 16
      for (int64_t i = 0; i < kHalf; ++i) {
        const __m512i a = r[g * kBooks + 2 * i], b = r[g * kBooks + 2 * i + 1];
        next[2 * g * kHalf + i] = _mm512_permutex2var_epi8(a, low, b);
        next[(2 * g + 1) * kHalf + i] = _mm512_permutex2var_epi8(a, high, b);
      }
    }
#pragma GCC unroll 16
    for (int64_t j = 0; j < kM; ++j) r[j] = next[j];
    transpose_stages<kM, kHalf>(r, plan, stage + 1);
  }
}

// Transposes a group of `codes` (<= 64) codes into words [M, 64] (see GroupTranspose).
template <int64_t kM, int kRegs>
void transpose_group(const uint8_t* group, int64_t codes, int64_t m_runtime, const GroupTranspose& plan,
                     uint8_t* words, __mmask64* beyond) {
  const int64_t M = kM > 0 ? kM : m_runtime;
  const int64_t bytes = codes * M;
  if constexpr (staged(kM)) {
    __m512i r[kM];  // [book group, code range]
    if (codes == kGroupCodes) {
#pragma GCC unroll 16
      for (int64_t w = 0; w < kM; ++w) r[w] = _mm512_loadu_si512(group + 64 * w);
    } else {
#pragma GCC unroll 16
      for (int64_t w = 0; w < kM; ++w) r[w] = load_window(group, bytes, w);
    }
    transpose_stages<kM, kM>(r, plan, 0);
#pragma GCC unroll 16
    for (int64_t m = 0; m < kM; ++m) store_words<kRegs>(r[m], m, words, beyond);
  } else {
    for (int64_t m = 0; m < M; ++m) {
      __m512i acc = _mm512_setzero_si512();
      for (int64_t w = 0; w < M; ++w) {
        const __m512i index = _mm512_load_si512(plan.index[m * M + w]);
        acc = _mm512_mask_permutexvar_epi8(acc, plan.lanes[m * M + w], index, load_window(group, bytes, w));
      }
      store_words<kRegs>(acc, m, words, beyond);
    }
  }
}

// The bytes of table [256] at words (64 lanes); lanes in `beyond` (words >= 64 * kRegs) take the
// table's last entry, which every word from 64 * kRegs on shares (checked by regs_needed).
template <int kRegs>
__m512i look_up(const uint8_t* table, __m512i words, __mmask64 beyond) {
  const __m512i t0 = _mm512_loadu_si512(table);
  if constexpr (kRegs == 4) {
    const __m512i t1 = _mm512_loadu_si512(table + 64);
    const __m512i low = _mm512_permutex2var_epi8(t0, words, t1);
    const __m512i high = _mm512_permutex2var_epi8(_mm512_loadu_si512(table + 128), words,
                                                  _mm512_loadu_si512(table + 192));
    return _mm512_mask_blend_epi8(beyond, low, high);
  } else if constexpr (kRegs == 2) {
    const __m512i t1 = _mm512_loadu_si512(table + 64);
    const __m512i fill = _mm512_set1_epi8(static_cast<char>(table[255]));
    return _mm512_mask_blend_epi8(beyond, _mm512_permutex2var_epi8(t0, words, t1), fill);
  } else {
    return _mm512_mask_permutexvar_epi8(_mm512_set1_epi8(static_cast<char>(table[255])), ~beyond, words, t0);
  }
}

// 1, 2 or 4: the table registers that hold every distinct entry of the chunk's byte tables.
int regs_needed(const FilterTables& tables, int64_t nq) {
  const int16_t widest = *std::max_element(tables.widths.begin(), tables.widths.begin() + nq * tables.M);
  return widest <= 64 ? 1 : widest <= 128 ? 2 : 4;
}

template <int64_t kM, int kRegs>
void scan_chunk(const float* luts, int64_t nq, const uint8_t* codes, int64_t m_runtime, int64_t first,
                int64_t end, const FilterTables& tables, const GroupTranspose& plan, TopK* tops) {
  const int64_t M = kM > 0 ? kM : m_runtime;
  alignas(64) uint8_t words[kBlockGroups * kMaxBooks * 64];  // [groups, M, 64]
  __mmask64 beyond[kBlockGroups * kMaxBooks];                // [groups, M]
  std::vector<int16_t> thresholds(static_cast<size_t>(nq));
  for (int64_t q = 0; q < nq; ++q) thresholds[q] = threshold_bytes(tables, q, tops[q].threshold);
  for (int64_t b0 = first; b0 < end; b0 += kBlockGroups * kGroupCodes) {
    const int64_t b1 = std::min(end, b0 + kBlockGroups * kGroupCodes);
    const int64_t groups = (b1 - b0 + kGroupCodes - 1) / kGroupCodes;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t g0 = b0 + g * kGroupCodes;
      const uint8_t* ahead = codes + (g0 + kPrefetchCodes) * M;  // past the end: harmless
      for (int64_t line = 0; line < M * kGroupCodes; line += 64)
        _mm_prefetch(reinterpret_cast<const char*>(ahead + line), _MM_HINT_T0);
      transpose_group<kM, kRegs>(codes + g0 * M, std::min(kGroupCodes, b1 - g0), M, plan,
                                 words + g * M * 64, beyond + g * M);
    }
    for (int64_t q = 0; q < nq; ++q) {
      const uint8_t* table = tables.bytes.data() + q * M * 256;
      const float* lut = luts + q * M * kLutStride;
      TopK& top = tops[q];
      __m512i threshold = _mm512_set1_epi16(thresholds[q]);
      for (int64_t g = 0; g < groups; ++g) {
        __m512i all = _mm512_setzero_si512(), odd = _mm512_setzero_si512();
        for (int64_t m = 0; m < M; ++m) {
          const __m512i w = _mm512_load_si512(words + (g * M + m) * 64);
          const __m512i v = look_up<kRegs>(table + m * 256, w, beyond[g * M + m]);
          all = _mm512_add_epi16(all, v);
          odd = _mm512_add_epi16(odd, _mm512_srli_epi16(v, 8));
        }
        const __m512i even = _mm512_sub_epi16(all, _mm512_slli_epi16(odd, 8));
        const uint32_t even_pass = _mm512_cmpgt_epi16_mask(even, threshold);
        const uint32_t odd_pass = _mm512_cmpgt_epi16_mask(odd, threshold);
        if ((even_pass | odd_pass) == 0) continue;
        // bit i: code g0 + i passed, in id order
        uint64_t pass =
            _pdep_u64(even_pass, 0x5555555555555555ull) | _pdep_u64(odd_pass, 0xAAAAAAAAAAAAAAAAull);
        const int64_t g0 = b0 + g * kGroupCodes;
        const float before = top.threshold;
        while (pass != 0) {
          const int64_t id = g0 + __builtin_ctzll(pass);
          pass &= pass - 1;
          if (id >= b1) break;
          const float s = exact_score<kM>(lut, codes + id * M, M);
          if (s > top.threshold) topk_offer(top, s, id);
        }
        if (top.threshold != before) {
          thresholds[q] = threshold_bytes(tables, q, top.threshold);
          threshold = _mm512_set1_epi16(thresholds[q]);
        }
      }
    }
  }
}

template <int64_t kM>
void scan_chunk_regs(int regs, const float* luts, int64_t nq, const uint8_t* codes, int64_t M, int64_t first,
                     int64_t end, const FilterTables& tables, const GroupTranspose& plan, TopK* tops) {
  switch (regs) {
    case 1: return scan_chunk<kM, 1>(luts, nq, codes, M, first, end, tables, plan, tops);
    case 2: return scan_chunk<kM, 2>(luts, nq, codes, M, first, end, tables, plan, tops);
    default: return scan_chunk<kM, 4>(luts, nq, codes, M, first, end, tables, plan, tops);
  }
}

// The transposed scan (M <= kMaxBooks) of queries [0, nq): fewer than kInterleavedMinQueries, so
// their byte tables stay in cache together.
void scan_transposed(const float* luts, int64_t nq, const uint8_t* codes, int64_t M, int64_t first, int64_t end,
                     TopK* tops) {
  GroupTranspose plan;
  plan_transpose(M, plan);
  FilterTables tables;
  build_filter_tables(luts, nq, M, tables);
  const int regs = regs_needed(tables, nq);
  switch (M) {
    case 2: return scan_chunk_regs<2>(regs, luts, nq, codes, M, first, end, tables, plan, tops);
    case 4: return scan_chunk_regs<4>(regs, luts, nq, codes, M, first, end, tables, plan, tops);
    case 8: return scan_chunk_regs<8>(regs, luts, nq, codes, M, first, end, tables, plan, tops);
    case 16: return scan_chunk_regs<16>(regs, luts, nq, codes, M, first, end, tables, plan, tops);
    default: return scan_chunk_regs<0>(regs, luts, nq, codes, M, first, end, tables, plan, tops);
  }
}

}  // namespace

// Queries go in groups of 32 to the interleaved scan; a last group of fewer than
// kInterleavedMinQueries, or all of them when that few, to the transposed scan (M <= 16) or the
// AVX2 scanner. A group costs the same however many of its lanes are used.
void adc_scan(const float* luts, int64_t nq, const uint8_t* codes, int64_t N, int64_t M,
              int64_t first, int64_t end, TopK* tops) {
  // Until 2k codes are in, every code passes: a range that short is better scanned in float.
  const bool short_range = nq > 0 && 2 * tops[0].k >= end - first;
  if (short_range) return scalar::adc_scan(luts, nq, codes, N, M, first, end, tops);
  int64_t interleaved = 0;  // queries [0, interleaved) by interleaved tables
  if (M <= kInterleavedMaxBooks) {
    const int64_t rest = nq % Lanes::kLanes;
    interleaved = nq - (rest < kInterleavedMinQueries ? rest : 0);
  }
  if (interleaved > 0) scan_interleaved<Lanes>(luts, interleaved, codes, M, first, end, tops);
  const int64_t left = nq - interleaved;
  if (left == 0) return;
  const float* left_luts = luts + interleaved * M * kLutStride;
  if (M > kMaxBooks) return avx2::adc_scan(left_luts, left, codes, N, M, first, end, tops + interleaved);
  scan_transposed(left_luts, left, codes, M, first, end, tops + interleaved);
}

}  // namespace opqn::cpu::avx512

#include "cpu/avx512_target_end.h"
#endif
