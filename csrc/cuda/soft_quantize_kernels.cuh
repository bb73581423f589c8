// The CUDA kernels of soft_quantize (host side: soft_quantize_cuda.cu). One thread block handles
// kTile samples of one book: it stages their sub-vectors in shared memory, computes the
// similarities (one thread per word, each assign_weight element read once per block, coalesced),
// the softmax and entropy (one warp per sample), and the reconstruction, all in one launch. The
// backward is one launch too: dL/dprobs from grad_quantized, the entropy and softmax gradients,
// dL/dx through the norm clamp; it leaves scale * dL/dlogits / n in a [B, M, K] buffer from which
// the weight gradients are one batched GEMM each (soft_quantize_common.cpp).
#pragma once

#include <cstddef>
#include <cstdint>

#include "cuda/cuda_utils.cuh"
#include "cuda/tile_products.cuh"
#include "norm_clamp.h"

namespace opqn::cuda {

constexpr int64_t kSoftQuantizeMaxDim = 256;  // d and K: shared memory is sized for up to this

template <typename acc_t>
constexpr int tile_rows() {
  return sizeof(acc_t) == 8 ? 4 : 8;  // samples per block: keeps shared memory under 48 KiB
}

// Grid of both kernels: (sample tiles, books).
template <typename acc_t>
dim3 soft_quantize_grid(int64_t B, int64_t M) {
  return dim3(static_cast<unsigned>(ceil_div(B, tile_rows<acc_t>())), static_cast<unsigned>(M));
}

// Dynamic shared memory of the forward and the backward kernel.
template <typename acc_t>
size_t forward_shared_bytes(int64_t d, int64_t K) {
  return static_cast<size_t>(tile_rows<acc_t>() * (d + K) + tile_rows<acc_t>()) * sizeof(acc_t);
}

template <typename acc_t>
size_t backward_shared_bytes(int64_t d, int64_t K) {
  return static_cast<size_t>(tile_rows<acc_t>() * (2 * d + 2 * K) + 2 * tile_rows<acc_t>()) * sizeof(acc_t);
}

// Warp-cooperative: the norm n of one staged sub-vector xs [d] and its softmax scale
// scale / max(n, eps) (just `scale` without normalize). Every lane gets both.
template <typename acc_t>
__device__ __forceinline__ void norm_and_scale(const acc_t* xs, int64_t d, int lane, acc_t scale,
                                               bool normalize, acc_t& n, acc_t& s) {
  n = 0;
  s = scale;
  if (!normalize) return;
  acc_t ss = 0;
  for (int64_t j = lane; j < d; j += kWarp) ss += xs[j] * xs[j];
  n = sqrt_of(warp_sum(ss));
  s = scale / (n > acc_t(kNormEps) ? n : acc_t(kNormEps));
}

// x: [B, M, d]; A, C: [M, d, K] -> probs: [B, M, K], quantized: [B, M, d], entropy: [B, M]
template <typename scalar_t, typename acc_t, int kTile>
__global__ void __launch_bounds__(kThreads)
soft_quantize_forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ A,
                             const scalar_t* __restrict__ C, scalar_t* __restrict__ probs,
                             scalar_t* __restrict__ quantized, scalar_t* __restrict__ entropy,
                             int64_t B, int64_t M, int64_t d, int64_t K, acc_t scale,
                             bool normalize) {
  OPQN_DYNAMIC_SHARED(unsigned char, smem_raw);
  acc_t* xs = reinterpret_cast<acc_t*>(smem_raw);  // [kTile, d]
  acc_t* ps = xs + kTile * d;                         // [kTile, K]
  acc_t* row_scale = ps + kTile * K;                  // [kTile]
  const int64_t m = blockIdx.y;
  const int64_t b0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int tid = threadIdx.x, warp = tid / kWarp, lane = tid % kWarp;
  const scalar_t* Am = A + m * d * K;
  const scalar_t* Cm = C + m * d * K;

  for (int64_t i = tid; i < kTile * d; i += kThreads) {
    const int64_t t = i / d, b = b0 + t;
    xs[i] = b < B ? static_cast<acc_t>(x[(b * M + m) * d + i % d]) : acc_t(0);
  }
  __syncthreads();
  for (int t = warp; t < kTile; t += kWarps) {
    acc_t n, s;
    norm_and_scale(xs + t * d, d, lane, scale, normalize, n, s);
    if (lane == 0) row_scale[t] = s;
  }
  __syncthreads();
  for (int64_t k = tid; k < K; k += kThreads) {
    acc_t acc[kTile];
    rows_times_column<kTile>(xs, d, Am, K, k, acc);
#pragma unroll
    for (int t = 0; t < kTile; ++t) ps[t * K + k] = acc[t] * row_scale[t];
  }
  __syncthreads();
  for (int t = warp; t < kTile; t += kWarps) {
    const int64_t b = b0 + t;
    if (b >= B) continue;
    acc_t* l = ps + t * K;
    acc_t mx = -INFINITY;
    for (int64_t k = lane; k < K; k += kWarp) mx = l[k] > mx ? l[k] : mx;
    mx = warp_max(mx);
    acc_t z = 0, s = 0;
    for (int64_t k = lane; k < K; k += kWarp) {
      const acc_t v = l[k] - mx;
      const acc_t e = exp_of(v);
      l[k] = e;
      z += e;
      s += e > acc_t(0) ? e * v : acc_t(0);
    }
    z = warp_sum(z);
    s = warp_sum(s);
    const acc_t inv = acc_t(1) / z;
    scalar_t* p_out = probs + (b * M + m) * K;
    for (int64_t k = lane; k < K; k += kWarp) {
      l[k] *= inv;
      p_out[k] = static_cast<scalar_t>(l[k]);
    }
    if (lane == 0) entropy[b * M + m] = static_cast<scalar_t>(log_of(z) - s * inv);
  }
  __syncthreads();
  for (int64_t j = tid; j < d; j += kThreads) {
    acc_t acc[kTile];
    rows_times_row<kTile>(ps, K, Cm, j, acc);
#pragma unroll
    for (int t = 0; t < kTile; ++t)
      if (b0 + t < B) quantized[((b0 + t) * M + m) * d + j] = static_cast<scalar_t>(acc[t]);
  }
}

// Output gradients gp [B, M, K], gq [B, M, d], gh [B, M] (each may be null) ->
// g: [B, M, K] (acc_t) = scale / n * dL/dlogits, grad_x: [B, M, d] (when non-null)
template <typename scalar_t, typename acc_t, int kTile>
__global__ void __launch_bounds__(kThreads)
soft_quantize_backward_kernel(const scalar_t* __restrict__ gp, const scalar_t* __restrict__ gq,
                              const scalar_t* __restrict__ gh, const scalar_t* __restrict__ x,
                              const scalar_t* __restrict__ A, const scalar_t* __restrict__ C,
                              const scalar_t* __restrict__ probs, acc_t* __restrict__ g_out,
                              scalar_t* __restrict__ grad_x, int64_t B, int64_t M, int64_t d,
                              int64_t K, acc_t scale, bool normalize) {
  OPQN_DYNAMIC_SHARED(unsigned char, smem_raw);
  acc_t* xs = reinterpret_cast<acc_t*>(smem_raw);  // [kTile, d] x (normalize only)
  acc_t* vs = xs + kTile * d;                         // [kTile, d] grad_quantized, then dL/dx
  acc_t* ps = vs + kTile * d;                         // [kTile, K] probs
  acc_t* gs = ps + kTile * K;                         // [kTile, K] dL/dprobs, then g
  acc_t* row_scale = gs + kTile * K;                  // [kTile] scale / n
  acc_t* row_norm = row_scale + kTile;                // [kTile] n
  const int64_t m = blockIdx.y;
  const int64_t b0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int tid = threadIdx.x, warp = tid / kWarp, lane = tid % kWarp;
  const scalar_t* Am = A + m * d * K;
  const scalar_t* Cm = C + m * d * K;

  for (int64_t i = tid; i < kTile * K; i += kThreads) {
    const int64_t t = i / K, b = b0 + t, off = (b * M + m) * K + i % K;
    ps[i] = b < B ? static_cast<acc_t>(probs[off]) : acc_t(0);
    gs[i] = (b < B && gp != nullptr) ? static_cast<acc_t>(gp[off]) : acc_t(0);
  }
  for (int64_t i = tid; i < kTile * d; i += kThreads) {
    const int64_t t = i / d, b = b0 + t, off = (b * M + m) * d + i % d;
    vs[i] = (b < B && gq != nullptr) ? static_cast<acc_t>(gq[off]) : acc_t(0);
    if (normalize) xs[i] = b < B ? static_cast<acc_t>(x[off]) : acc_t(0);
  }
  __syncthreads();
  for (int t = warp; t < kTile; t += kWarps) {
    acc_t n, s;
    norm_and_scale(xs + t * d, d, lane, scale, normalize, n, s);
    if (lane == 0) {
      row_scale[t] = s;
      row_norm[t] = n;
    }
  }
  if (gq != nullptr) {  // dL/dprobs += grad_quantized @ C[m]
    for (int64_t k = tid; k < K; k += kThreads) {
      acc_t acc[kTile];
      rows_times_column<kTile>(vs, d, Cm, K, k, acc);
#pragma unroll
      for (int t = 0; t < kTile; ++t) gs[t * K + k] += acc[t];
    }
  }
  __syncthreads();
  for (int t = warp; t < kTile; t += kWarps) {
    const int64_t b = b0 + t;
    if (b >= B) continue;
    const acc_t* p = ps + t * K;
    acc_t* gr = gs + t * K;
    const acc_t h = gh != nullptr ? static_cast<acc_t>(gh[b * M + m]) : acc_t(0);
    acc_t pg = 0;
    for (int64_t k = lane; k < K; k += kWarp) {
      // dH/dp_k = -(log p_k + 1); the constant cancels in the softmax backward.
      if (h != acc_t(0)) gr[k] -= h * (p[k] > acc_t(0) ? log_of(p[k]) : acc_t(0));
      pg += p[k] * gr[k];
    }
    pg = warp_sum(pg);
    acc_t* g_row = g_out + (b * M + m) * K;
    for (int64_t k = lane; k < K; k += kWarp) {
      gr[k] = row_scale[t] * p[k] * (gr[k] - pg);
      g_row[k] = gr[k];
    }
  }
  if (grad_x == nullptr) return;
  __syncthreads();
  for (int64_t j = tid; j < d; j += kThreads) {  // (dL/dxhat) / n = g @ A[m]^T
    acc_t acc[kTile];
    rows_times_row<kTile>(gs, K, Am, j, acc);
#pragma unroll
    for (int t = 0; t < kTile; ++t) vs[t * d + j] = acc[t];
  }
  __syncthreads();
  for (int t = warp; t < kTile; t += kWarps) {
    const int64_t b = b0 + t;
    if (b >= B) continue;
    acc_t* v = vs + t * d;
    if (normalize && row_norm[t] >= acc_t(kNormEps)) {  // dL/dx = v - xhat (xhat . v)
      acc_t xv = 0;
      for (int64_t j = lane; j < d; j += kWarp) xv += xs[t * d + j] * v[j];
      const acc_t c = warp_sum(xv) / (row_norm[t] * row_norm[t]);
      for (int64_t j = lane; j < d; j += kWarp) v[j] -= xs[t * d + j] * c;
    }
    scalar_t* gx = grad_x + (b * M + m) * d;
    for (int64_t j = lane; j < d; j += kWarp) gx[j] = static_cast<scalar_t>(v[j]);
  }
}

}  // namespace opqn::cuda
