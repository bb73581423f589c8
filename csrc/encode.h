// Argument checks of encode, shared by its CPU and CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include "soft_quantize.h"

namespace opqn {

// Codes are uint8: at most this many words per book.
constexpr int64_t kMaxWords = 256;

// Validates x [B, M*d] or [B, M, d] and assign_weight [M, d, K] with K <= 256.
SoftQuantizeDims check_encode_args(const at::Tensor& x, const at::Tensor& assign_weight);

// The kernels' verdict on the similarities they took the argmax of: every one finite, which holds
// exactly when x and assign_weight are finite (short of an overflow), since a NaN or an infinity
// in either makes every similarity of its (sample, book) NaN or infinite. Checked there, during
// the argmax, at no extra pass over x; a NaN has no argmax, so this is an error.
void check_similarities_finite(bool all_finite);

}  // namespace opqn
