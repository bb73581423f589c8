// Per-row kernels of the fused CPU soft_quantize (softmax + entropy, their backward, the norm
// clamp, the products of small batches), compiled once per instruction set (row_kernels_scalar.cpp, row_kernels_avx2.cpp) from
// row_kernels_impl.h; row_kernels<T>() returns the set for the active ISA (cpu_isa.h).
// A row is one (sample, book) pair; rows are contiguous ([B, M, *] tensors seen as [B*M, *]).
// Where `norms` is given (normalize=True), row r is scaled by 1 / max(norms[r], eps) on top of
// `scale`: x @ A / n equals xhat @ A, so xhat itself is never formed.
#pragma once

#include <cstdint>
#include <functional>

namespace opqn::cpu {

// Up to this many multiply-adds per product (rows * d * K), a forward's products run as row loops
// (RowKernels::row_products, parallel over samples: for_sample_rows), where a batched BLAS call
// costs more than its arithmetic (it has 50-110 us of fixed cost here): float up to 2^21 (64
// queries of 8 x 64 x 64, 8 of 2 x 256 x 256), where the vector row loops were as fast or faster
// than BLAS at every shape measured; double only up to 2^15, its plain loops being slower sooner.
template <typename T>
constexpr int64_t kRowProductsMaxMacs = sizeof(T) == sizeof(float) ? int64_t(1) << 21 : int64_t(1) << 15;

// Row loops split into chunks of at least this many multiply-adds (a query or two run on the
// calling thread: waking the pool would cost more).
constexpr int64_t kRowChunkMacs = int64_t(1) << 16;

// Runs fn(first_row, rows) over the B * M rows of B samples of M books, in parallel chunks of
// whole samples (so that row r of a chunk is of book r % M) of at least kRowChunkMacs, a row
// costing macs_per_row multiply-adds.
void for_sample_rows(int64_t B, int64_t M, int64_t macs_per_row, const std::function<void(int64_t, int64_t)>& fn);

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
