// Shared by the CPU and CUDA soft_quantize kernels: argument checks and the weight gradients.
#pragma once

#include <array>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include "norm_clamp.h"

namespace opqn {

// Sizes of one soft_quantize problem: B samples, M books, K words of dimension d.
struct SoftQuantizeDims {
  int64_t B, M, d, K;
};

// Validates x [B, M*d] or [B, M, d] against weights [M, d, K] (named `weight_name`).
SoftQuantizeDims check_x_and_weights(const at::Tensor& x, const at::Tensor& weights,
                                     const char* weight_name);

// Validates x [B, M*d] or [B, M, d], assign_weight and codebook [M, d, K], and scale.
SoftQuantizeDims check_soft_quantize_args(const at::Tensor& x, const at::Tensor& assign_weight,
                                          const at::Tensor& codebook, double scale);

// The inputs of soft_quantize_backward, validated and contiguous; absent gradients undefined.
struct SoftQuantizeBackwardInputs {
  SoftQuantizeDims dims;
  at::Tensor x;                                         // [B, M, d]
  at::Tensor assign_weight, codebook;                   // [M, d, K]
  at::Tensor probs;                                     // [B, M, K]
  at::Tensor grad_probs, grad_quantized, grad_entropy;  // [B, M, K], [B, M, d], [B, M]
};

SoftQuantizeBackwardInputs prepare_backward_inputs(
    const c10::optional<at::Tensor>& grad_probs, const c10::optional<at::Tensor>& grad_quantized,
    const c10::optional<at::Tensor>& grad_entropy, const at::Tensor& x,
    const at::Tensor& assign_weight, const at::Tensor& codebook, const at::Tensor& probs,
    double scale);

// The outputs of soft_quantize_backward from the per-sample results: grad_x [B, M, d] (viewed as
// x_sizes) and g [B, M, K] (see assign_weight_grad), or grad_assign_weight where the caller
// computed it already; empty tensors where output_mask is false.
std::tuple<at::Tensor, at::Tensor, at::Tensor> finish_backward(const SoftQuantizeBackwardInputs& in,
                                                               const at::Tensor& grad_x,
                                                               const at::Tensor& g,
                                                               at::IntArrayRef x_sizes,
                                                               std::array<bool, 3> output_mask,
                                                               const at::Tensor& grad_assign_weight = {});

// grad_assign_weight [M, d, K] = sum_b x[b, m]^T gl[b, m], where gl [B, M, K] already holds
// scale * dL/dlogits divided by the norm clamp of x (so x itself stands in for xhat).
at::Tensor assign_weight_grad(const at::Tensor& x3, const at::Tensor& gl, at::ScalarType dtype);

// grad_codebook [M, d, K] = sum_b grad_quantized[b, m]^T probs[b, m].
at::Tensor codebook_grad(const at::Tensor& grad_quantized, const at::Tensor& probs,
                         at::ScalarType dtype);

}  // namespace opqn
