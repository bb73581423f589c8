// The CUDA kernel of encode (host side: encode_cuda.cu): a block stages kEncodeTile samples of one
// book in shared memory, computes their similarities to every word (column-form tile product,
// tile_products.cuh: assign_weight read coalesced) and takes the argmax per sample with one warp
// (ties to the smaller word), flagging any similarity that is NaN or infinite (encode.h).
#pragma once

#include <cstddef>
#include <cstdint>

#include "cuda/cuda_utils.cuh"
#include "cuda/tile_products.cuh"

namespace opqn::cuda {

constexpr int kEncodeTile = 8;
constexpr int64_t kEncodeMaxDim = 1024;  // d: shared memory holds the staged tile of samples

// Grid (sample tiles, books) and dynamic shared memory of encode_kernel: xs [kEncodeTile, ds],
// ls [kEncodeTile, K], the tile product's scratch.
inline dim3 encode_grid(int64_t B, int64_t M) {
  return dim3(static_cast<unsigned>(ceil_div(B, kEncodeTile)), static_cast<unsigned>(M));
}

template <typename acc_t>
size_t encode_shared_bytes(int64_t d, int64_t K) {
  return shared_bytes<acc_t>(kEncodeTile * (staged_stride<acc_t>(d) + K) + column_product_scratch<acc_t, kEncodeTile>(K));
}

// x: [B, M, d]; A: [M, d, K] -> codes: [B, M]; *nonfinite set to 1 where a similarity is not finite
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
encode_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ A, uint8_t* __restrict__ codes,
              int* __restrict__ nonfinite, int64_t B, int64_t M, int64_t d, int64_t K) {
  OPQN_DYNAMIC_SHARED(unsigned char, smem_raw);
  const int ds = static_cast<int>(staged_stride<acc_t>(d)), n_d = static_cast<int>(d);
  acc_t* xs = reinterpret_cast<acc_t*>(smem_raw);  // [kEncodeTile, ds], zero past d
  acc_t* ls = xs + kEncodeTile * ds;                // [kEncodeTile, K]
  acc_t* scratch = ls + kEncodeTile * K;
  const int64_t m = blockIdx.y;
  const int64_t b0 = static_cast<int64_t>(blockIdx.x) * kEncodeTile;
  const int tid = threadIdx.x, warp = tid / kWarp, lane = tid % kWarp;
  for (int t = 0; t < kEncodeTile; ++t) {
    const int64_t b = b0 + t;
    for (int j = tid; j < ds; j += kThreads)
      xs[t * ds + j] = b < B && j < n_d ? static_cast<acc_t>(x[(b * M + m) * d + j]) : acc_t(0);
  }
  __syncthreads();
  block_rows_times_columns<kEncodeTile>(xs, n_d, A + m * d * K, static_cast<int>(K), scratch,
                                        [&](int t, int k, acc_t v) { ls[t * K + k] = v; });
  __syncthreads();
  for (int t = warp; t < kEncodeTile; t += kWarps) {
    const int64_t b = b0 + t;
    if (b >= B) continue;
    acc_t best = ls[t * K];
    int best_k = 0;
    bool finite = true;
    for (int64_t k = lane; k < K; k += kWarp) {
      finite = finite && finite_of(ls[t * K + k]);
      if (ls[t * K + k] > best) {
        best = ls[t * K + k];
        best_k = static_cast<int>(k);
      }
    }
    if (!finite) *nonfinite = 1;
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      const acc_t other = __shfl_xor_sync(0xffffffffu, best, offset);
      const int other_k = __shfl_xor_sync(0xffffffffu, best_k, offset);
      if (other > best || (other == best && other_k < best_k)) {
        best = other;
        best_k = other_k;
      }
    }
    if (lane == 0) codes[b * M + m] = static_cast<uint8_t>(best_k);
  }
}

}  // namespace opqn::cuda
