// Argument checks and table padding of adc_topk, adc_topk4 and adc_scores, shared by their CPU and
// CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>

namespace opqn {

struct AdcDims {
  int64_t nq, M, K, N;
};

// Most books a code may have.
constexpr int64_t kMaxBooks = 256;

// Validates lut [nq, M, K] float32 with 1 <= M <= 256 books and 1 <= K <= max_words words, all
// finite (one pass over lut, and a sync on CUDA); `codes` names the code format in the message.
void check_lut(const at::Tensor& lut, int64_t max_words, const char* codes);

// Validates a uint8 code tensor `name` of the given rank, on the device of lut.
void check_code_tensor(const at::Tensor& t, const at::Tensor& lut, const char* name, int64_t rank,
                       const char* shape);

// Validates 1 <= k <= N.
void check_k(int64_t k, int64_t N);

// Validates lut (check_lut, K <= 256) and codes [N, M] uint8.
AdcDims check_lut_and_codes(const at::Tensor& lut, const at::Tensor& codes);

// check_lut_and_codes, and 1 <= k <= N.
AdcDims check_adc_args(const at::Tensor& lut, const at::Tensor& codes, int64_t k);

// adc_topk4's arguments: lut [nq, M, K <= 16], packed [blocks, (M + 1) / 2, 32] uint8 holding
// num_codes codes, 1 <= k <= num_codes, rerank >= 1.
void check_adc4_args(const at::Tensor& lut, const at::Tensor& packed, int64_t num_codes, int64_t k,
                     int64_t rerank);

// lut [nq, M, K] -> [nq, M, width], zero past K: any code below width indexes inside it (a code
// >= K adds 0 to the score); width 256 covers every uint8 code, 16 every 4-bit one.
at::Tensor pad_lut(const at::Tensor& lut, int64_t width = 256);

}  // namespace opqn
