// CUDA kernel of encode: a block stages kTile samples of one book in shared memory, computes their
// similarities to every word (one thread per word, coalesced assign_weight reads) and takes the
// argmax per sample with one warp (ties to the smaller word).
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/cuda_utils.cuh"
#include "cuda/tile_products.cuh"
#include "encode.h"

namespace opqn::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarp;
constexpr int kTile = 8;
constexpr int64_t kMaxDim = 1024;  // d: shared memory holds kTile * (d + K) accumulators

// x: [B, M, d]; A: [M, d, K] -> codes: [B, M]
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
encode_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ A, uint8_t* __restrict__ codes,
              int64_t B, int64_t M, int64_t d, int64_t K) {
  extern __shared__ unsigned char smem_raw[];
  acc_t* xs = reinterpret_cast<acc_t*>(smem_raw);  // [kTile, d]
  acc_t* ls = xs + kTile * d;                         // [kTile, K]
  const int64_t m = blockIdx.y;
  const int64_t b0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int tid = threadIdx.x, warp = tid / kWarp, lane = tid % kWarp;
  for (int64_t i = tid; i < kTile * d; i += kThreads) {
    const int64_t b = b0 + i / d;
    xs[i] = b < B ? static_cast<acc_t>(x[(b * M + m) * d + i % d]) : acc_t(0);
  }
  __syncthreads();
  for (int64_t k = tid; k < K; k += kThreads) {
    acc_t acc[kTile];
    rows_times_column<kTile>(xs, d, A + m * d * K, K, k, acc);
#pragma unroll
    for (int t = 0; t < kTile; ++t) ls[t * K + k] = acc[t];
  }
  __syncthreads();
  for (int t = warp; t < kTile; t += kWarps) {
    const int64_t b = b0 + t;
    if (b >= B) continue;
    acc_t best = ls[t * K];
    int best_k = 0;
    for (int64_t k = lane; k < K; k += kWarp) {
      if (ls[t * K + k] > best) {
        best = ls[t * K + k];
        best_k = static_cast<int>(k);
      }
    }
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

at::Tensor encode_cuda(const at::Tensor& x_in, const at::Tensor& assign_weight, bool normalize) {
  const auto dims = check_encode_args(x_in, assign_weight);
  (void)normalize;  // a positive scale per row: the argmax does not change
  const auto [B, M, d, K] = dims;
  TORCH_CHECK(d <= kMaxDim, "encode on CUDA supports d up to ", kMaxDim, ", got d=", d);
  TORCH_CHECK(M <= 65535, "encode on CUDA supports up to 65535 books, got M=", M);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor A = assign_weight.contiguous();
  at::Tensor codes = at::empty({B, M}, x.options().dtype(at::kByte));
  if (B == 0) return codes;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "encode_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const dim3 grid(static_cast<unsigned>(ceil_div(B, kTile)), static_cast<unsigned>(M));
    const size_t smem = kTile * (d + K) * sizeof(acc_t);
    const auto kernel = encode_kernel<scalar_t, acc_t>;
    if (smem > 48 * 1024) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(smem)));
    }
    kernel<<<grid, kThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<scalar_t>(), A.const_data_ptr<scalar_t>(), codes.mutable_data_ptr<uint8_t>(),
        B, M, d, K);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return codes;
}

}  // namespace

TORCH_LIBRARY_IMPL(opqn_ext, CUDA, m) { m.impl("encode", &encode_cuda); }

}  // namespace opqn::cuda
