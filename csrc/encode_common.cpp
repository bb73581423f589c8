#include "encode.h"

namespace opqn {

SoftQuantizeDims check_encode_args(const at::Tensor& x, const at::Tensor& assign_weight) {
  const auto dims = check_x_and_weights(x, assign_weight, "assign_weight");
  TORCH_CHECK(dims.K <= kMaxWords, "assign_weight has K=", dims.K,
              " words per book; codes are uint8, so K must be <= ", kMaxWords);
  return dims;
}

void check_similarities_finite(bool all_finite) {
  TORCH_CHECK(all_finite, "x must be finite to encode, and so must assign_weight: they contain NaN or infinite "
              "values (or their similarities overflow), which have no argmax");
}

}  // namespace opqn
