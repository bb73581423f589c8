// Products of a tile of rows staged in shared memory with one book's weight matrix, one output
// column or row per thread; shared by the soft_quantize and encode kernels.
#pragma once

#include <cstdint>

namespace opqn::cuda {

// For kTile rows staged in shared memory (rows: [kTile, n]), two products with a [n, K]-shaped
// weight matrix w of one book:
// column k of rows @ w: acc[t] = sum_j rows[t, j] w[j, k] (threads on consecutive k: coalesced)
template <int kTile, typename acc_t, typename scalar_t>
__device__ __forceinline__ void rows_times_column(const acc_t* rows, int64_t n,
                                                  const scalar_t* __restrict__ w, int64_t K,
                                                  int64_t k, acc_t (&acc)[kTile]) {
#pragma unroll
  for (int t = 0; t < kTile; ++t) acc[t] = 0;
  for (int64_t j = 0; j < n; ++j) {
    const acc_t wj = static_cast<acc_t>(w[j * K + k]);
#pragma unroll
    for (int t = 0; t < kTile; ++t) acc[t] += rows[t * n + j] * wj;
  }
}

// entry j of rows @ w^T (rows: [kTile, K]): acc[t] = sum_k rows[t, k] w[j, k]
template <int kTile, typename acc_t, typename scalar_t>
__device__ __forceinline__ void rows_times_row(const acc_t* rows, int64_t K,
                                               const scalar_t* __restrict__ w, int64_t j,
                                               acc_t (&acc)[kTile]) {
#pragma unroll
  for (int t = 0; t < kTile; ++t) acc[t] = 0;
  const scalar_t* w_row = w + j * K;
  for (int64_t k = 0; k < K; ++k) {
    const acc_t wk = static_cast<acc_t>(w_row[k]);
#pragma unroll
    for (int t = 0; t < kTile; ++t) acc[t] += rows[t * K + k] * wk;
  }
}

}  // namespace opqn::cuda
