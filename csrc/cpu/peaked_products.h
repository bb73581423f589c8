// The CPU soft_quantize's products for peaked assignments (row_kernels.h, "Peaked rows"): each
// (sample, book) row visits only the words it keeps, instead of the dense BLAS products.
#pragma once

#include <ATen/core/Tensor.h>

#include "soft_quantize.h"

namespace opqn::cpu {

// Whether the products of probs [B, M, K] (float32 or float64) with words of dimension d take the
// peaked-row kernels: a batch above the row loops' size (kRowProductsMaxMacs: below it, transposing
// the weights costs more than the products) that keeps at most peaked_max_density of its words.
bool use_peaked_products(const at::Tensor& probs, int64_t d);

// quantized [B, M, d] = probs @ codebook^T per book, over the kept words.
void peaked_reconstruct(const at::Tensor& probs, const at::Tensor& codebook, at::Tensor& quantized);

struct PeakedGradients {
  at::Tensor grad_x;              // [B, M, d] ([0, M, d] when not wanted)
  at::Tensor g;                   // [B, M, K]: scale * dL/dlogits / norm clamp, 0 at words not kept
  at::Tensor grad_assign_weight;  // [M, d, K], or undefined when not wanted
};

// The backward of soft_quantize up to the codebook's gradient (finish_backward).
PeakedGradients peaked_backward(const SoftQuantizeBackwardInputs& in, double scale, bool normalize,
                                bool need_x, bool need_a);

}  // namespace opqn::cpu
