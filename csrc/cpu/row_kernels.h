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

// RowKernels::transpose_rows works in tiles of this many rows and columns, whose rows and columns
// both stay in cache; a parallel transpose gives each task whole strips of this many rows.
constexpr int64_t kTransposeTile = 32;

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

  // Peaked rows: the products that visit only the words a row keeps, p >= floor (kept_floor), from
  // transposed weights At/Ct: [M, K, d] (word k of book m a contiguous row of d); row r is of book r % M.
  // probs: [n] -> how many are kept (NaN counts as kept, so that it propagates)
  int64_t (*count_kept)(const T* probs, int64_t n, T floor);
  // probs: [rows, K] -> out: [rows, d] = sum over kept k of probs[r, k] * Ct[r % M, k]
  void (*peaked_reconstructions)(const T* probs, const T* Ct, int64_t rows, int64_t M, int64_t d, int64_t K,
                                 T floor, T* out);
  // As softmax_backward_rows, with dL/dprobs formed here for the kept words only: grad_probs
  // [rows, K], grad_quantized [rows, d] (with Ct) and grad_entropy [rows] each nullptr when absent;
  // g: [rows, K] out, 0 at the words not kept; grad_x: [rows, d] = g @ A^T (from At), or nullptr;
  // kept_words: [rows, K] out, row r's kept words first, kept_counts: [rows] out, how many.
  void (*peaked_backward_rows)(const T* probs, const T* grad_probs, const T* grad_quantized,
                               const T* grad_entropy, const T* Ct, const T* At, int64_t rows, int64_t M,
                               int64_t d, int64_t K, T scale, const T* norms, T floor, T* g, T* grad_x,
                               int32_t* kept_words, int32_t* kept_counts);
  // The columns [j0, j1) of one book's transposed weight gradient: grad_t [K, j1 - j0] +=
  // sum_b g[b, book, k] * x[b, book, j0:j1] over the kept words of peaked_backward_rows, in sample
  // order; x: [B, M, d], g, kept_words: [B, M, K], kept_counts: [B, M]
  void (*peaked_weight_grad)(const T* x, const T* g, const int32_t* kept_words, const int32_t* kept_counts,
                             int64_t B, int64_t M, int64_t d, int64_t K, int64_t book, int64_t j0, int64_t j1,
                             T* grad_t);
  // s: [R, C] -> o: [C, R], o[c, r] = s[r, c] for the rows r in [r0, r1) (the strips of a parallel
  // transpose): the transposed weights above, and the weight gradient's slices transposed back
  void (*transpose_rows)(const T* s, T* o, int64_t R, int64_t C, int64_t r0, int64_t r1);
};

// Peaked assignments (the low-entropy rows that training with the entropy penalty converges to)
// keep most of their mass in a few words. Their products can visit only the words with p >= floor:
// the words left out hold less than one unit roundoff of probability together (float32 2^-24,
// float64 2^-53), so leaving them out changes the outputs by about as much as the rounding of the
// dense products does.
template <typename T>
T kept_floor(int64_t K) {
  return (sizeof(T) == sizeof(float) ? T(1) / T(int64_t(1) << 24) : T(1) / T(int64_t(1) << 53)) / T(K);
}

// The peaked-row products replace the BLAS ones where at most this share of the words is kept.
// Measured break-even (float32, B = 256, 2 threads): about 0.3 for d x K = 64 x 64 and 128 x 64,
// about 0.1 for 256 x 256, whose transposed weights (1 KiB a word) no longer stay in L1.
inline double peaked_max_density(int64_t d, int64_t K) { return d * K <= 128 * 64 ? 0.25 : 0.1; }

template <typename T>
const RowKernels<T>& row_kernels();

}  // namespace opqn::cpu
