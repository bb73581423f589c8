#include "soft_quantize.h"

#include <cmath>

#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include "checks.h"

namespace opqn {

SoftQuantizeDims check_x_and_weights(const at::Tensor& x, const at::Tensor& weights,
                                     const char* weight_name) {
  check_defined(x, "x");
  check_defined(weights, weight_name);
  check_floating(x, "x");
  check_rank(weights, 3, weight_name, "[M, d, K]");
  check_same_dtype(weights, x, weight_name, "x");
  check_same_device(weights, x, weight_name, "x");
  const int64_t M = weights.size(0), d = weights.size(1), K = weights.size(2);
  TORCH_CHECK(M >= 1 && d >= 1 && K >= 1, weight_name, " must have M, d, K >= 1, got shape ",
              weights.sizes());
  TORCH_CHECK(x.dim() == 2 || x.dim() == 3, "x must have shape [B, M*d] or [B, M, d], got ",
              x.dim(), " dims with shape ", x.sizes());
  if (x.dim() == 2) {
    TORCH_CHECK(x.size(1) == M * d, "x must have M*d = ", M, "*", d, " = ", M * d,
                " columns to match ", weight_name, " ", weights.sizes(), ", got shape ", x.sizes());
  } else {
    TORCH_CHECK(x.size(1) == M && x.size(2) == d, "x must have shape [B, ", M, ", ", d,
                "] to match ", weight_name, " ", weights.sizes(), ", got ", x.sizes());
  }
  return {x.size(0), M, d, K};
}

SoftQuantizeDims check_soft_quantize_args(const at::Tensor& x, const at::Tensor& assign_weight,
                                          const at::Tensor& codebook, double scale) {
  check_defined(codebook, "codebook");
  check_rank(codebook, 3, "codebook", "[M, d, K]");
  const auto dims = check_x_and_weights(x, assign_weight, "assign_weight");
  check_same_dtype(codebook, x, "codebook", "x");
  check_same_device(codebook, x, "codebook", "x");
  check_shape(codebook, assign_weight.sizes(), "codebook (it must match assign_weight)");
  TORCH_CHECK(dims.K <= dims.d, "codebook has K=", dims.K, " words of dimension d=", dims.d,
              "; orthonormal codewords need K <= d");
  TORCH_CHECK(std::isfinite(scale), "scale must be finite, got ", scale);
  return dims;
}

namespace {
void check_optional_grad(const c10::optional<at::Tensor>& grad, at::IntArrayRef shape,
                         const at::Tensor& x, const char* name) {
  if (!grad.has_value() || !grad->defined()) return;
  check_shape(*grad, shape, name);
  check_same_dtype(*grad, x, name, "x");
  check_same_device(*grad, x, name, "x");
}
}  // namespace

at::Tensor contiguous_or_undefined(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->contiguous() : at::Tensor();
}
SoftQuantizeBackwardInputs prepare_backward_inputs(
    const c10::optional<at::Tensor>& grad_probs, const c10::optional<at::Tensor>& grad_quantized,
    const c10::optional<at::Tensor>& grad_entropy, const at::Tensor& x,
    const at::Tensor& assign_weight, const at::Tensor& codebook, const at::Tensor& probs,
    double scale) {
  const auto dims = check_soft_quantize_args(x, assign_weight, codebook, scale);
  check_defined(probs, "probs");
  check_shape(probs, {dims.B, dims.M, dims.K}, "probs");
  check_same_dtype(probs, x, "probs", "x");
  check_same_device(probs, x, "probs", "x");
  check_optional_grad(grad_probs, {dims.B, dims.M, dims.K}, x, "grad_probs");
  check_optional_grad(grad_quantized, {dims.B, dims.M, dims.d}, x, "grad_quantized");
  check_optional_grad(grad_entropy, {dims.B, dims.M}, x, "grad_entropy");
  return {dims,
          x.contiguous().view({dims.B, dims.M, dims.d}),
          assign_weight.contiguous(),
          codebook.contiguous(),
          probs.contiguous(),
          contiguous_or_undefined(grad_probs),
          contiguous_or_undefined(grad_quantized),
          contiguous_or_undefined(grad_entropy)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> finish_backward(const SoftQuantizeBackwardInputs& in,
                                                               const at::Tensor& grad_x,
                                                               const at::Tensor& g,
                                                               at::IntArrayRef x_sizes,
                                                               std::array<bool, 3> output_mask,
                                                               const at::Tensor& grad_assign_weight) {
  const auto [need_x, need_a, need_c] = output_mask;
  const auto dtype = in.x.scalar_type();
  const at::Tensor none = at::empty({0}, in.x.options());
  at::Tensor grad_c = none;
  if (need_c) {
    grad_c = in.grad_quantized.defined() ? codebook_grad(in.grad_quantized, in.probs, dtype)
                                         : at::zeros(in.codebook.sizes(), in.x.options());
  }
  return {need_x ? grad_x.view(x_sizes) : none,
          need_a ? (grad_assign_weight.defined() ? grad_assign_weight : assign_weight_grad(in.x, g, dtype)) : none,
          grad_c};
}

at::Tensor assign_weight_grad(const at::Tensor& x3, const at::Tensor& gl, at::ScalarType dtype) {
  // x3: [B, M, d] -> [M, d, B]; gl: [B, M, K] -> [M, B, K]; result [M, d, K]
  return at::bmm(x3.to(gl.scalar_type()).permute({1, 2, 0}), gl.permute({1, 0, 2})).to(dtype);
}

at::Tensor codebook_grad(const at::Tensor& grad_quantized, const at::Tensor& probs,
                         at::ScalarType dtype) {
  // grad_quantized: [B, M, d] -> [M, d, B]; probs: [B, M, K] -> [M, B, K]
  const auto acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
  return at::bmm(grad_quantized.to(acc).permute({1, 2, 0}), probs.to(acc).permute({1, 0, 2}))
      .to(dtype);
}

}  // namespace opqn
