// Argument checks of encode, shared by its CPU and CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include "soft_quantize.h"

namespace opqn {

// Codes are uint8: at most this many words per book.
constexpr int64_t kMaxWords = 256;

// Validates x [B, M*d] or [B, M, d] and assign_weight [M, d, K] with K <= 256; x must be finite
// (a NaN has no argmax), which costs one pass over x (and a sync on CUDA).
SoftQuantizeDims check_encode_args(const at::Tensor& x, const at::Tensor& assign_weight);

}  // namespace opqn
