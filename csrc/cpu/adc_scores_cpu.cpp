// CPU adc_scores: the dense score matrix of every query against every code. Books are added in
// book order, as in the scanners, so every score equals the one adc_topk reports.
#include <algorithm>

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "adc.h"
#include "cpu/adc_scan.h"

namespace opqn::cpu {
namespace {

constexpr int64_t kBlockCodes = 2048;  // codes scored for every query of a task before the next block

template <int64_t kM>
void score_block(const float* lut, const uint8_t* codes, int64_t m_runtime, int64_t first,
                 int64_t end, float* out) {
  const int64_t M = kM > 0 ? kM : m_runtime;
  for (int64_t i = first; i < end; ++i) {
    const uint8_t* c = codes + i * M;
    float s = 0.0f;
    for (int64_t m = 0; m < M; ++m) s += lut[m * kLutStride + c[m]];
    out[i] = s;
  }
}

void score_range(const float* lut, const uint8_t* codes, int64_t M, int64_t first, int64_t end,
                 float* out) {
  switch (M) {
    case 4: return score_block<4>(lut, codes, M, first, end, out);
    case 8: return score_block<8>(lut, codes, M, first, end, out);
    case 16: return score_block<16>(lut, codes, M, first, end, out);
    default: return score_block<0>(lut, codes, M, first, end, out);
  }
}

at::Tensor adc_scores_cpu(const at::Tensor& lut, const at::Tensor& codes_in) {
  const auto [nq, M, K, N] = check_lut_and_codes(lut, codes_in);
  at::Tensor scores = at::empty({nq, N}, lut.options());  // [nq, N]
  if (nq == 0 || N == 0) return scores;
  const at::Tensor luts = pad_lut(lut.contiguous());  // [nq, M, 256]
  const at::Tensor codes = codes_in.contiguous();
  const float* lut_ptr = luts.const_data_ptr<float>();
  const uint8_t* code_ptr = codes.const_data_ptr<uint8_t>();
  float* out = scores.mutable_data_ptr<float>();
  const int64_t blocks = (N + kBlockCodes - 1) / kBlockCodes;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t first = b * kBlockCodes, last = std::min(N, first + kBlockCodes);
      for (int64_t q = 0; q < nq; ++q)
        score_range(lut_ptr + q * M * kLutStride, code_ptr, M, first, last, out + q * N);
    }
  });
  return scores;
}

}  // namespace

TORCH_LIBRARY_IMPL(opqn_ext, CPU, m) { m.impl("adc_scores", &adc_scores_cpu); }

}  // namespace opqn::cpu
