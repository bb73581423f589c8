// The CUDA kernels of soft_quantize (host side: soft_quantize_cuda.cu). One thread block handles
// kTile samples of one book: it stages their sub-vectors in shared memory, computes the
// similarities (column-form tile product: assign_weight read coalesced, once per block), the
// softmax and entropy (one warp per sample), and the reconstruction (row-form tile product: the
// codebook staged through shared memory in coalesced chunks), all in one launch. The backward is
// one launch too: dL/dprobs from grad_quantized, the entropy and softmax gradients, dL/dx through
// the norm clamp; it leaves scale * dL/dlogits / n in a [B, M, K] buffer from which the weight
// gradients are one batched GEMM each (soft_quantize_common.cpp). Tile products: tile_products.cuh.
#pragma once

#include <cstddef>
#include <cstdint>

#include "cuda/cuda_utils.cuh"
#include "cuda/tile_products.cuh"
#include "norm_clamp.h"

namespace opqn::cuda {

constexpr int64_t kSoftQuantizeMaxDim = kThreads;  // d and K: one thread per output of a tile product

template <typename acc_t>
constexpr int tile_rows() {
  return sizeof(acc_t) == 8 ? 4 : 8;  // samples per block
}

// Grid of both kernels: (sample tiles, books).
template <typename acc_t>
dim3 soft_quantize_grid(int64_t B, int64_t M) {
  return dim3(static_cast<unsigned>(ceil_div(B, tile_rows<acc_t>())), static_cast<unsigned>(M));
}

// Shared memory of the forward kernel, offsets in acc_t elements: xs [kTile, ds] (x), ps [kTile, ks]
// (logits, then probs), the tile products' scratch, row_scale [kTile].
template <typename acc_t>
struct ForwardShared {
  static constexpr int kTile = tile_rows<acc_t>();
  int64_t ds, ks, ps, scratch, row_scale, elements;
  constexpr ForwardShared(int64_t d, int64_t K)
      : ds(staged_stride<acc_t>(d)), ks(staged_stride<acc_t>(K)), ps(kTile * ds), scratch(ps + kTile * ks),
        row_scale(scratch + products_scratch<acc_t, kTile>(d, K)), elements(row_scale + kTile) {}
};

// Shared memory of the backward kernel: xs [kTile, ds] (x, normalize only), vs [kTile, ds]
// (grad_quantized, then dL/dx), ps [kTile, ks] (probs), gs [kTile, ks] (dL/dprobs, then g), the tile
// products' scratch, row_scale [kTile] (scale / n), row_norm [kTile] (n).
template <typename acc_t>
struct BackwardShared {
  static constexpr int kTile = tile_rows<acc_t>();
  int64_t ds, ks, vs, ps, gs, scratch, row_scale, row_norm, elements;
  constexpr BackwardShared(int64_t d, int64_t K)
      : ds(staged_stride<acc_t>(d)), ks(staged_stride<acc_t>(K)), vs(kTile * ds), ps(vs + kTile * ds),
        gs(ps + kTile * ks), scratch(gs + kTile * ks),
        row_scale(scratch + products_scratch<acc_t, kTile>(d, K)), row_norm(row_scale + kTile),
        elements(row_norm + kTile) {}
};

// Dynamic shared memory of the forward and the backward kernel (over 48 KiB at the largest d and K:
// the host raises the kernels' limit, shared_limit.h).
template <typename acc_t>
size_t forward_shared_bytes(int64_t d, int64_t K) {
  return shared_bytes<acc_t>(ForwardShared<acc_t>(d, K).elements);
}

template <typename acc_t>
size_t backward_shared_bytes(int64_t d, int64_t K) {
  return shared_bytes<acc_t>(BackwardShared<acc_t>(d, K).elements);
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
  static_assert(kTile == ForwardShared<acc_t>::kTile, "the launch's tile is the shared layout's");
  OPQN_DYNAMIC_SHARED(unsigned char, smem_raw);
  const ForwardShared<acc_t> layout(d, K);
  acc_t* const base = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* xs = base;                            // [kTile, ds], zero past d
  acc_t* ps = base + layout.ps;                // [kTile, ks], zero past K
  acc_t* scratch = base + layout.scratch;
  acc_t* row_scale = base + layout.row_scale;  // [kTile]
  const int ds = static_cast<int>(layout.ds), ks = static_cast<int>(layout.ks);
  const int n_d = static_cast<int>(d), n_k = static_cast<int>(K);
  const int64_t m = blockIdx.y;
  const int64_t b0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int tid = threadIdx.x, warp = tid / kWarp, lane = tid % kWarp;

  for (int t = 0; t < kTile; ++t) {
    const int64_t b = b0 + t;
    for (int j = tid; j < ds; j += kThreads)
      xs[t * ds + j] = b < B && j < n_d ? static_cast<acc_t>(x[(b * M + m) * d + j]) : acc_t(0);
    for (int k = n_k + tid; k < ks; k += kThreads) ps[t * ks + k] = 0;
  }
  __syncthreads();
  for (int t = warp; t < kTile; t += kWarps) {
    acc_t n, s;
    norm_and_scale(xs + t * ds, d, lane, scale, normalize, n, s);
    if (lane == 0) row_scale[t] = s;
  }
  __syncthreads();
  block_rows_times_columns<kTile>(xs, n_d, A + m * d * K, n_k, scratch,
                                  [&](int t, int k, acc_t v) { ps[t * ks + k] = v * row_scale[t]; });
  __syncthreads();
  for (int t = warp; t < kTile; t += kWarps) {
    const int64_t b = b0 + t;
    if (b >= B) continue;
    acc_t* l = ps + t * ks;
    acc_t mx = -INFINITY;
    for (int k = lane; k < n_k; k += kWarp) mx = l[k] > mx ? l[k] : mx;
    mx = warp_max(mx);
    acc_t z = 0, s = 0;
    for (int k = lane; k < n_k; k += kWarp) {
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
    for (int k = lane; k < n_k; k += kWarp) {
      l[k] *= inv;
      p_out[k] = static_cast<scalar_t>(l[k]);
    }
    if (lane == 0) entropy[b * M + m] = static_cast<scalar_t>(log_of(z) - s * inv);
  }
  __syncthreads();
  block_rows_times_rows<kTile>(ps, n_k, C + m * d * K, n_d, scratch, [&](int t, int j, acc_t v) {
    if (b0 + t < B) quantized[((b0 + t) * M + m) * d + j] = static_cast<scalar_t>(v);
  });
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
  static_assert(kTile == BackwardShared<acc_t>::kTile, "the launch's tile is the shared layout's");
  OPQN_DYNAMIC_SHARED(unsigned char, smem_raw);
  const BackwardShared<acc_t> layout(d, K);
  acc_t* const base = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* xs = base;                            // [kTile, ds] x (normalize only)
  acc_t* vs = base + layout.vs;                // [kTile, ds] grad_quantized, then dL/dx; zero past d
  acc_t* ps = base + layout.ps;                // [kTile, ks] probs
  acc_t* gs = base + layout.gs;                // [kTile, ks] dL/dprobs, then g; zero past K
  acc_t* scratch = base + layout.scratch;
  acc_t* row_scale = base + layout.row_scale;  // [kTile] scale / n
  acc_t* row_norm = base + layout.row_norm;    // [kTile] n
  const int ds = static_cast<int>(layout.ds), ks = static_cast<int>(layout.ks);
  const int n_d = static_cast<int>(d), n_k = static_cast<int>(K);
  const int64_t m = blockIdx.y;
  const int64_t b0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int tid = threadIdx.x, warp = tid / kWarp, lane = tid % kWarp;

  for (int t = 0; t < kTile; ++t) {
    const int64_t b = b0 + t;
    for (int k = tid; k < ks; k += kThreads) {
      const int64_t off = (b * M + m) * K + k;
      const bool inside = b < B && k < n_k;
      ps[t * ks + k] = inside ? static_cast<acc_t>(probs[off]) : acc_t(0);
      gs[t * ks + k] = inside && gp != nullptr ? static_cast<acc_t>(gp[off]) : acc_t(0);
    }
    for (int j = tid; j < ds; j += kThreads) {
      const int64_t off = (b * M + m) * d + j;
      const bool inside = b < B && j < n_d;
      vs[t * ds + j] = inside && gq != nullptr ? static_cast<acc_t>(gq[off]) : acc_t(0);
      if (normalize) xs[t * ds + j] = inside ? static_cast<acc_t>(x[off]) : acc_t(0);
    }
  }
  __syncthreads();
  for (int t = warp; t < kTile; t += kWarps) {
    acc_t n, s;
    norm_and_scale(xs + t * ds, d, lane, scale, normalize, n, s);
    if (lane == 0) {
      row_scale[t] = s;
      row_norm[t] = n;
    }
  }
  if (gq != nullptr) {  // dL/dprobs += grad_quantized @ C[m]
    block_rows_times_columns<kTile>(vs, n_d, C + m * d * K, n_k, scratch,
                                    [&](int t, int k, acc_t v) { gs[t * ks + k] += v; });
  }
  __syncthreads();
  for (int t = warp; t < kTile; t += kWarps) {
    const int64_t b = b0 + t;
    if (b >= B) continue;
    const acc_t* p = ps + t * ks;
    acc_t* gr = gs + t * ks;
    const acc_t h = gh != nullptr ? static_cast<acc_t>(gh[b * M + m]) : acc_t(0);
    acc_t pg = 0;
    for (int k = lane; k < n_k; k += kWarp) {
      // dH/dp_k = -(log p_k + 1); the constant cancels in the softmax backward.
      if (h != acc_t(0)) gr[k] -= h * (p[k] > acc_t(0) ? log_of(p[k]) : acc_t(0));
      pg += p[k] * gr[k];
    }
    pg = warp_sum(pg);
    acc_t* g_row = g_out + (b * M + m) * K;
    for (int k = lane; k < n_k; k += kWarp) {
      gr[k] = row_scale[t] * p[k] * (gr[k] - pg);
      g_row[k] = gr[k];
    }
  }
  if (grad_x == nullptr) return;
  __syncthreads();
  // (dL/dxhat) / n = g @ A[m]^T
  block_rows_times_rows<kTile>(gs, n_k, A + m * d * K, n_d, scratch,
                               [&](int t, int j, acc_t v) { vs[t * ds + j] = v; });
  __syncthreads();
  for (int t = warp; t < kTile; t += kWarps) {
    const int64_t b = b0 + t;
    if (b >= B) continue;
    acc_t* v = vs + t * ds;
    const acc_t* xr = xs + t * ds;
    if (normalize && row_norm[t] >= acc_t(kNormEps)) {  // dL/dx = v - xhat (xhat . v)
      acc_t xv = 0;
      for (int j = lane; j < n_d; j += kWarp) xv += xr[j] * v[j];
      const acc_t c = warp_sum(xv) / (row_norm[t] * row_norm[t]);
      for (int j = lane; j < n_d; j += kWarp) v[j] -= xr[j] * c;
    }
    scalar_t* gx = grad_x + (b * M + m) * d;
    for (int j = lane; j < n_d; j += kWarp) gx[j] = static_cast<scalar_t>(v[j]);
  }
}

}  // namespace opqn::cuda
