// CPU adc_topk4: quantizes each query's table to small integers, runs the 4-bit scanner of the
// active ISA through search_topk (topk_tasks.h) keeping the rerank * k best approximate scores,
// then re-scores the candidates exactly with the float table (entries added in book order, as
// adc_topk does) and keeps the best k in result order (score descending, then smaller index).
#include <algorithm>
#include <cmath>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "adc.h"
#include "cpu/adc_scan.h"
#include "cpu/cpu_isa.h"
#include "cpu/fastscan4.h"
#include "cpu/topk_tasks.h"

namespace opqn::cpu {

Scan4Fn scanner4() {
#if defined(__x86_64__) || defined(__i386__)
  if (active_cpu_isa() >= CpuIsa::Avx512) return &avx512::scan4;
  if (active_cpu_isa() >= CpuIsa::Avx2) return &avx2::scan4;
#endif
  return &scalar::scan4;
}

namespace {

constexpr int64_t kMinBlocksPerPart = 512;  // 16384 codes
constexpr int64_t kRescoreLanes = 8;         // candidates re-scored together

// lut: [nq, M, K] -> [nq, pairs, 32] tables of integers: per book, entries minus the book's
// minimum, times one scale per query chosen so that a code's sum never exceeds 32767. In double:
// a float range can overflow (entries near +-FLT_MAX) and so can the scale of a subnormal one.
std::vector<uint8_t> quantize_tables(const float* lut, int64_t nq, int64_t M, int64_t K, int64_t pairs) {
  std::vector<uint8_t> tables(static_cast<size_t>(nq * pairs * 32), 0);
  const double levels = static_cast<double>(std::min<int64_t>(255, 32767 / (2 * pairs)));
  for (int64_t q = 0; q < nq; ++q) {
    const float* l = lut + q * M * K;
    double range = 0.0;
    for (int64_t m = 0; m < M; ++m) {
      const auto [lo, hi] = std::minmax_element(l + m * K, l + (m + 1) * K);
      range = std::max(range, double(*hi) - double(*lo));
    }
    const double scale = range > 0.0 ? levels / range : 0.0;
    for (int64_t m = 0; m < M; ++m) {
      const double bias = *std::min_element(l + m * K, l + (m + 1) * K);
      uint8_t* t = tables.data() + (q * pairs + m / 2) * 32 + (m % 2) * 16;
      for (int64_t k = 0; k < K; ++k)
        t[k] = static_cast<uint8_t>(std::min(levels, std::nearbyint((double(l[m * K + k]) - bias) * scale)));
    }
  }
  return tables;
}

std::tuple<at::Tensor, at::Tensor> adc_topk4_cpu(const at::Tensor& lut_in, const at::Tensor& packed_in,
                                                 int64_t num_codes, int64_t k, int64_t rerank) {
  check_adc4_args(lut_in, packed_in, num_codes, k, rerank);
  const at::Tensor lut = lut_in.contiguous();
  const at::Tensor packed = packed_in.contiguous();
  const int64_t nq = lut.size(0), M = lut.size(1), K = lut.size(2), pairs = packed.size(1);
  const int64_t blocks = packed.size(0);
  at::Tensor scores = at::empty({nq, k}, lut.options());
  at::Tensor indices = at::empty({nq, k}, lut.options().dtype(at::kLong));
  if (nq == 0) return {scores, indices};
  const float* lut_ptr = lut.const_data_ptr<float>();
  const uint8_t* packed_ptr = packed.const_data_ptr<uint8_t>();
  const std::vector<uint8_t> tables = quantize_tables(lut_ptr, nq, M, K, pairs);
  const at::Tensor padded = pad_lut(lut, 16);  // [nq, M, 16]: missing words add 0
  const float* padded_ptr = padded.const_data_ptr<float>();
  const int64_t candidates = std::min(num_codes, rerank * k);
  const Scan4Fn scan = scanner4();

  // Candidates are re-scored exactly: the float table, entries added in book order as adc_topk does,
  // kRescoreLanes candidates at a time so that their chains of additions overlap. Their blocks are
  // prefetched first, so the scattered reads overlap too.
  const auto exact = [&](int64_t q, ScoredId* candidates, int64_t n) {
    for (int64_t c = 0; c < n; ++c) {
      const uint8_t* block = packed_ptr + candidates[c].id / kBlockCodes4 * pairs * 32;
      for (int64_t line = 0; line < pairs * 32; line += 64) __builtin_prefetch(block + line);
    }
    const float* table = padded_ptr + q * M * 16;
    for (int64_t c0 = 0; c0 < n; c0 += kRescoreLanes) {
      const int64_t lanes = std::min(kRescoreLanes, n - c0);
      const uint8_t* words[kRescoreLanes];  // byte of book m of lane i: words[i][16 m]
      int shifts[kRescoreLanes];
      float sums[kRescoreLanes] = {};
      for (int64_t i = 0; i < kRescoreLanes; ++i) {
        const int64_t id = candidates[c0 + std::min(i, lanes - 1)].id, j = id % kBlockCodes4;
        words[i] = packed_ptr + id / kBlockCodes4 * pairs * 32 + j % 16;
        shifts[i] = j < 16 ? 0 : 4;
      }
      for (int64_t m = 0; m < M; ++m)
        for (int64_t i = 0; i < kRescoreLanes; ++i) sums[i] += table[m * 16 + ((words[i][16 * m] >> shifts[i]) & 15)];
      for (int64_t i = 0; i < lanes; ++i) candidates[c0 + i].score = sums[i];
    }
  };
  search_topk(
      nq, 1, blocks, kMinBlocksPerPart, candidates, k,
      [&](int64_t q0, int64_t q1, int64_t b0, int64_t b1, TopK* tops) {
        scan(tables.data() + q0 * pairs * 32, q1 - q0, packed_ptr, pairs, num_codes, b0, b1, tops);
      },
      exact, scores.mutable_data_ptr<float>(), indices.mutable_data_ptr<int64_t>());
  return {scores, indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(opqn_ext, CPU, m) { m.impl("adc_topk4", &adc_topk4_cpu); }

}  // namespace opqn::cpu
