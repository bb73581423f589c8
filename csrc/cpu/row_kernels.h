// Per-row kernels of the fused CPU soft_quantize (softmax + entropy, their backward, the norm
// clamp, the products of small batches), compiled once per instruction set (row_kernels_scalar.cpp, row_kernels_avx2.cpp) from
// row_kernels_impl.h; row_kernels<T>() returns the set for the active ISA (cpu_isa.h).
// A row is one (sample, book) pair; rows are contiguous ([B, M, *] tensors seen as [B*M, *]).
// Where `norms` is given (normalize=True), row r is scaled by 1 / max(norms[r], eps) on top of
// `scale`: x @ A / n equals xhat @ A, so xhat itself is never formed.
#pragma once

#include <cstdint>

namespace opqn::cpu {

// Up to this many multiply-adds per product (rows * d * K), a forward's products run as row loops
// (RowKernels::row_products): a query or a few, whose BLAS calls cost more than their arithmetic.
constexpr int64_t kRowProductsMaxMacs = int64_t(1) << 15;

template <typename T>
struct RowKernels {
  // x: [rows, d] -> norms: [rows] = ||x[r]||
  void (*row_norms)(const T* x, int64_t rows, int64_t d, T* norms);
  // logits: [rows, K] (x @ A), replaced in place by softmax(scale / n_r * logits);
  // entropy: [rows] = -sum_k p log p
  void (*softmax_entropy_rows)(T* logits, int64_t rows, int64_t K, T scale, const T* norms,
                               T* entropy);
  // probs: [rows, K]; grad_entropy: [rows] or nullptr; g: [rows, K], in: dL/dprobs,
  // out: scale / n_r * dL/dlogits (the entropy term included)
  void (*softmax_backward_rows)(const T* probs, const T* grad_entropy, T* g, int64_t rows,
                                int64_t K, T scale, const T* norms);
  // x: [rows, d]; g: [rows, d], in: (dL/dxhat) / n_r, out: dL/dx through the norm clamp
  void (*normalize_backward_rows)(const T* x, const T* norms, T* g, int64_t rows, int64_t d);
  // The products of a few rows, where a BLAS call costs more than its arithmetic; row r is of
  // book r % M. x: [rows, d], A: [M, d, K] -> logits: [rows, K], logits[r] = x[r] @ A[r % M]
  void (*row_products)(const T* x, const T* A, int64_t rows, int64_t M, int64_t d, int64_t K, T* logits);
  // probs: [rows, K] -> out: [rows, d], out[r] = C[r % M] @ probs[r], C: [M, d, K]
  void (*row_reconstructions)(const T* probs, const T* C, int64_t rows, int64_t M, int64_t d, int64_t K, T* out);
};

template <typename T>
const RowKernels<T>& row_kernels();

}  // namespace opqn::cpu
