#include "encode.h"

#include <ATen/ops/isfinite.h>

namespace opqn {

SoftQuantizeDims check_encode_args(const at::Tensor& x, const at::Tensor& assign_weight) {
  const auto dims = check_x_and_weights(x, assign_weight, "assign_weight");
  TORCH_CHECK(dims.K <= kMaxWords, "assign_weight has K=", dims.K,
              " words per book; codes are uint8, so K must be <= ", kMaxWords);
  TORCH_CHECK(x.numel() == 0 || at::isfinite(x).all().item<bool>(),
              "x must be finite to encode: it contains NaN or infinite values");
  return dims;
}

}  // namespace opqn
