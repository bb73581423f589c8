// Block-wide products of a tile of kTile rows staged in shared memory with one book's weight matrix
// w: [n, K] (row-major, global memory), shared by the soft_quantize and encode kernels:
//   column form  out[t, k] = sum_j rows[t, j] w[j, k]   (x @ A, grad_quantized @ C)
//   row form     out[t, j] = sum_k rows[t, k] w[j, k]   (probs @ C^T, g @ A^T)
// Every thread of the block calls them (they synchronize); each result is handed to
// emit(t, column, value) by exactly one thread, which the caller's next barrier publishes.
// - Staged rows are 16-byte aligned with a row stride of staged_stride(width) elements, zero past
//   the width, and are read a 16-byte vector at a time (the same address for the whole warp).
// - Column form: one thread per k, w read straight from global memory (consecutive k: coalesced).
// - Row form: w goes through shared memory in chunks of kChunk columns, read along its rows
//   (coalesced) and stored transposed, so that one thread per j reads it conflict-free.
// - When a row has fewer outputs than half the block, groups of threads split the sum and their
//   partial sums are added in group order through `scratch` (deterministic).
#pragma once

#include <cstdint>

#include "cuda/cuda_utils.cuh"

namespace opqn::cuda {

template <typename acc_t>
constexpr int kVec = 16 / static_cast<int>(sizeof(acc_t));  // elements per vector load

template <typename acc_t>
constexpr int kChunk = 8 * kVec<acc_t>;  // row-form columns staged per step: 128 bytes of each w row

// Row stride of a staged tile of `width` elements per row.
template <typename acc_t>
constexpr int64_t staged_stride(int64_t width) {
  return (width + kVec<acc_t> - 1) / kVec<acc_t> * kVec<acc_t>;
}

// Groups of threads sharing each sum when a row has `outputs` results: the most (up to 8) that
// still leave a thread for every output.
constexpr int split_groups(int64_t outputs) {
  int groups = 1;
  while (groups < 8 && kThreads / (2 * groups) >= outputs) groups *= 2;
  return groups;
}

// Shared scratch (acc_t elements) of the column form with K outputs per row.
template <typename acc_t, int kTile>
constexpr int64_t column_product_scratch(int64_t K) {
  return split_groups(K) > 1 ? int64_t{kTile} * kThreads : 0;
}

// Shared scratch (acc_t elements) of the row form with n outputs per row: a transposed chunk of w
// (odd row stride: the transposing stores hit distinct banks), later the groups' partial sums.
template <typename acc_t, int kTile>
constexpr int64_t row_product_scratch(int64_t n) {
  const int64_t chunk = int64_t{kChunk<acc_t>} * (n | 1);
  const int64_t partials = split_groups(n) > 1 ? int64_t{kTile} * kThreads : 0;
  return chunk > partials ? chunk : partials;
}

// Shared scratch (acc_t elements) for both forms over [d, K] weights, used one after the other.
template <typename acc_t, int kTile>
constexpr int64_t products_scratch(int64_t d, int64_t K) {
  const int64_t column = column_product_scratch<acc_t, kTile>(K), row = row_product_scratch<acc_t, kTile>(d);
  return column > row ? column : row;
}

// Dynamic shared memory bytes of `elements` acc_t values, whole 16-byte vectors.
template <typename acc_t>
size_t shared_bytes(int64_t elements) {
  return static_cast<size_t>(ceil_div(elements * int64_t{sizeof(acc_t)}, 16) * 16);
}

template <typename T>
struct alignas(16) Vec16 {
  T v[kVec<T>];
};

template <typename T>
__device__ __forceinline__ Vec16<T> load_vec16(const T* p) {
  return *reinterpret_cast<const Vec16<T>*>(p);
}

// This thread's sums acc (group grp, output col) -> emit(t, col, the sum over the groups): directly
// with one group, else through scratch, added in group order.
template <int kTile, typename acc_t, typename Emit>
__device__ __forceinline__ void emit_sums(const acc_t (&acc)[kTile], int outputs, int groups, int grp, int col,
                                          acc_t* scratch, Emit& emit) {
  if (groups == 1) {
    if (col < outputs) {
#pragma unroll
      for (int t = 0; t < kTile; ++t) emit(t, col, acc[t]);
    }
    return;
  }
  const int per_group = kThreads / groups;
#pragma unroll
  for (int t = 0; t < kTile; ++t) scratch[(grp * kTile + t) * per_group + col] = acc[t];
  __syncthreads();
#pragma unroll
  for (int t = 0; t < kTile; ++t) {
    for (int c = static_cast<int>(threadIdx.x); c < outputs; c += kThreads) {
      acc_t sum = 0;
      for (int g = 0; g < groups; ++g) sum += scratch[(g * kTile + t) * per_group + c];
      emit(t, c, sum);
    }
  }
}

// rows: [kTile, staged_stride(n)] (shared); w: [n, K] -> emit(t, k, sum_j rows[t, j] w[j, k])
// scratch: column_product_scratch(K) elements of shared memory.
template <int kTile, typename acc_t, typename scalar_t, typename Emit>
__device__ __forceinline__ void block_rows_times_columns(const acc_t* rows, int n,
                                                         const scalar_t* __restrict__ w, int K,
                                                         acc_t* scratch, Emit emit) {
  constexpr int V = kVec<acc_t>;
  const int stride = static_cast<int>(staged_stride<acc_t>(n));
  const int groups = split_groups(K), per_group = kThreads / groups;
  const int k = static_cast<int>(threadIdx.x) % per_group, grp = static_cast<int>(threadIdx.x) / per_group;
  const int span = (n + groups * V - 1) / (groups * V) * V;  // this group's j: whole vectors, the last ends at n
  const int j0 = grp * span < n ? grp * span : n;
  const int j1 = j0 + span < n ? j0 + span : n;
  acc_t acc[kTile];
#pragma unroll
  for (int t = 0; t < kTile; ++t) acc[t] = 0;
  if (k < K) {
    const int j_vec = j0 + (j1 - j0) / V * V;
    const scalar_t* wp = w + j0 * K + k;
    for (int j = j0; j < j_vec; j += V, wp += V * K) {
      acc_t wv[V];
#pragma unroll
      for (int v = 0; v < V; ++v) wv[v] = static_cast<acc_t>(wp[v * K]);
#pragma unroll
      for (int t = 0; t < kTile; ++t) {
        const Vec16<acc_t> r = load_vec16(rows + t * stride + j);
#pragma unroll
        for (int v = 0; v < V; ++v) acc[t] += r.v[v] * wv[v];
      }
    }
    for (int j = j_vec; j < j1; ++j, wp += K) {
      const acc_t wj = static_cast<acc_t>(*wp);
#pragma unroll
      for (int t = 0; t < kTile; ++t) acc[t] += rows[t * stride + j] * wj;
    }
  }
  emit_sums<kTile>(acc, K, groups, grp, k, scratch, emit);
}

// rows: [kTile, staged_stride(K)] (shared); w: [n, K] -> emit(t, j, sum_k rows[t, k] w[j, k])
// scratch: row_product_scratch(n) elements of shared memory.
template <int kTile, typename acc_t, typename scalar_t, typename Emit>
__device__ __forceinline__ void block_rows_times_rows(const acc_t* rows, int K, const scalar_t* __restrict__ w,
                                                      int n, acc_t* scratch, Emit emit) {
  constexpr int V = kVec<acc_t>, kc = kChunk<acc_t>;
  const int stride = static_cast<int>(staged_stride<acc_t>(K)), ws_stride = n | 1;
  const int groups = split_groups(n), per_group = kThreads / groups, share = kc / groups;
  const int tid = static_cast<int>(threadIdx.x), j = tid % per_group, grp = tid / per_group;
  acc_t acc[kTile];
#pragma unroll
  for (int t = 0; t < kTile; ++t) acc[t] = 0;
  for (int k0 = 0; k0 < K; k0 += kc) {
    {  // scratch[kk, jj] = w[jj, k0 + kk], zero past K: a thread keeps its kk, lanes read along w's rows
      constexpr int kRowsPerPass = kThreads / kc;
      const int kk = tid % kc;
      const bool in_k = k0 + kk < K;
      const scalar_t* src = w + tid / kc * K + k0 + kk;
      acc_t* dst = scratch + kk * ws_stride;
      for (int jj = tid / kc; jj < n; jj += kRowsPerPass, src += kRowsPerPass * K)
        dst[jj] = in_k ? static_cast<acc_t>(*src) : acc_t(0);
    }
    __syncthreads();
    if (j < n) {
      const int kb = grp * share, ke = kb + share < stride - k0 ? kb + share : stride - k0;
      for (int kk = kb; kk < ke; kk += V) {
        acc_t wv[V];
#pragma unroll
        for (int v = 0; v < V; ++v) wv[v] = scratch[(kk + v) * ws_stride + j];
#pragma unroll
        for (int t = 0; t < kTile; ++t) {
          const Vec16<acc_t> r = load_vec16(rows + t * stride + k0 + kk);
#pragma unroll
          for (int v = 0; v < V; ++v) acc[t] += r.v[v] * wv[v];
        }
      }
    }
    __syncthreads();
  }
  emit_sums<kTile>(acc, n, groups, grp, j, scratch, emit);
}

}  // namespace opqn::cuda
