// Argument checks and table padding of adc_topk, shared by its CPU and CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>

namespace opqn {

struct AdcDims {
  int64_t nq, M, K, N;
};

// Most books a code may have.
constexpr int64_t kMaxBooks = 256;

// Validates lut [nq, M, K] float32 (finite; K <= 256), codes [N, M] uint8 and 1 <= k <= N.
// The finiteness check is one pass over lut (and a sync on CUDA).
AdcDims check_adc_args(const at::Tensor& lut, const at::Tensor& codes, int64_t k);

// lut [nq, M, K] -> [nq, M, 256], zero past K: any uint8 code indexes inside it (a code >= K
// adds 0 to the score).
at::Tensor pad_lut(const at::Tensor& lut);

}  // namespace opqn
