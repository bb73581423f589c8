// CUDA adc_topk and adc_scores. The database is scanned in chunks of bounded size: a kernel scores every code of
// a chunk for every query (the query's padded table in shared memory, one code per thread, codes
// read in order), turning each score into a rank key that also encodes the code's position; the
// chunk's top-k is at::topk over those unique keys, merged into the running top-k by a stable
// sort. Scores add the table entries in book order, as the CPU scanners do, so they are
// bit-identical to the CPU's; equal scores rank by smaller index.
#include <algorithm>

#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/topk.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "adc.h"
#include "cuda/cuda_utils.cuh"

namespace opqn::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kLutStride = 256;
constexpr int64_t kMaxSharedLutBooks = 48;        // 48 books * 256 floats = 48 KiB of shared memory
constexpr int64_t kChunkElements = int64_t(1) << 24;  // scores + keys of one chunk: 192 MiB at most
constexpr uint32_t kLocalMask = 0xFFFFFFFFu;

// A key whose signed order is (score ascending, then local index descending): the largest key is
// the best-ranked code.
__device__ __forceinline__ int64_t rank_key(float score, uint32_t local) {
  const uint32_t u = __float_as_uint(score);
  const uint32_t ordered = (u & 0x80000000u) ? ~u : (u | 0x80000000u);  // increasing with score
  const uint64_t key = (static_cast<uint64_t>(ordered) << 32) | (kLocalMask - local);
  return static_cast<int64_t>(key ^ 0x8000000000000000ull);
}

// luts: [nq, M, 256]; codes: [N, M] -> scores, keys (unless null): [nq, count] for codes
// [first, first + count)
template <bool kSharedLut>
__global__ void __launch_bounds__(kThreads)
adc_chunk_kernel(const float* __restrict__ luts, const uint8_t* __restrict__ codes, int64_t M,
                 int64_t first, int64_t count, float* __restrict__ scores, int64_t* __restrict__ keys) {
  extern __shared__ float lut_shared[];  // [M, 256] when kSharedLut
  const int64_t q = blockIdx.y;
  const float* lut = luts + q * M * kLutStride;
  if (kSharedLut) {
    for (int64_t i = threadIdx.x; i < M * kLutStride; i += kThreads) lut_shared[i] = lut[i];
    __syncthreads();
    lut = lut_shared;
  }
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= count) return;
  const uint8_t* c = codes + (first + i) * M;
  float s = 0.0f;
  for (int64_t m = 0; m < M; ++m) s += lut[m * kLutStride + c[m]];
  scores[q * count + i] = s;
  if (keys != nullptr) keys[q * count + i] = rank_key(s, static_cast<uint32_t>(i));
}

// Scores codes [first, first + count) for every query of luts [nq <= 65535, M, 256] into
// scores [nq, count] (and keys [nq, count] when defined).
void launch_chunk(const at::Tensor& luts, const at::Tensor& codes, int64_t first, int64_t count,
                  at::Tensor& scores, at::Tensor* keys) {
  const int64_t nq = luts.size(0), M = luts.size(1);
  const bool shared_lut = M <= kMaxSharedLutBooks;
  const size_t smem = shared_lut ? M * kLutStride * sizeof(float) : 0;
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(adc_chunk_kernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  }
  const dim3 grid(static_cast<unsigned>(ceil_div(count, kThreads)), static_cast<unsigned>(nq));
  const auto kernel = shared_lut ? adc_chunk_kernel<true> : adc_chunk_kernel<false>;
  kernel<<<grid, kThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(
      luts.const_data_ptr<float>(), codes.const_data_ptr<uint8_t>(), M, first, count,
      scores.mutable_data_ptr<float>(), keys ? keys->mutable_data_ptr<int64_t>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> adc_topk_cuda(const at::Tensor& lut, const at::Tensor& codes_in,
                                                 int64_t k) {
  const auto [nq, M, K, N] = check_adc_args(lut, codes_in, k);
  TORCH_CHECK(nq <= 65535, "adc_topk on CUDA takes up to 65535 queries per call, got ", nq,
              " (split the queries into batches)");
  const c10::cuda::CUDAGuard guard(lut.device());
  if (nq == 0) {
    return {at::empty({0, k}, lut.options()), at::empty({0, k}, lut.options().dtype(at::kLong))};
  }
  const at::Tensor luts = pad_lut(lut.contiguous());
  const at::Tensor codes = codes_in.contiguous();
  const int64_t chunk = std::min(N, std::max({k, int64_t(1) << 16, kChunkElements / nq}));
  TORCH_CHECK(chunk <= kLocalMask, "adc_topk on CUDA: chunk too large");
  at::Tensor best_scores, best_indices;
  for (int64_t first = 0; first < N; first += chunk) {
    const int64_t count = std::min(chunk, N - first);
    at::Tensor scores = at::empty({nq, count}, lut.options());
    at::Tensor keys = at::empty({nq, count}, lut.options().dtype(at::kLong));
    launch_chunk(luts, codes, first, count, scores, &keys);
    const at::Tensor top_keys = std::get<0>(keys.topk(std::min(k, count), 1, true, true));
    const at::Tensor local = top_keys.bitwise_and(static_cast<int64_t>(kLocalMask)).neg().add(static_cast<int64_t>(kLocalMask));
    at::Tensor chunk_scores = scores.gather(1, local);
    at::Tensor chunk_indices = local.add(first);
    if (!best_scores.defined()) {
      best_scores = chunk_scores;
      best_indices = chunk_indices;
      continue;
    }
    // Running results precede this chunk's in the concatenation and have smaller indices, and
    // each side is already in result order: a stable sort by score keeps ties by index.
    const at::Tensor all_scores = at::cat({best_scores, chunk_scores}, 1);
    const at::Tensor all_indices = at::cat({best_indices, chunk_indices}, 1);
    const auto [sorted, order] = all_scores.sort(true, 1, true);
    best_scores = sorted.narrow(1, 0, k).contiguous();
    best_indices = all_indices.gather(1, order.narrow(1, 0, k));
  }
  return {best_scores, best_indices};
}

at::Tensor adc_scores_cuda(const at::Tensor& lut, const at::Tensor& codes_in) {
  const auto [nq, M, K, N] = check_lut_and_codes(lut, codes_in);
  const c10::cuda::CUDAGuard guard(lut.device());
  at::Tensor scores = at::empty({nq, N}, lut.options());  // [nq, N]
  if (nq == 0 || N == 0) return scores;
  const at::Tensor luts = pad_lut(lut.contiguous());
  const at::Tensor codes = codes_in.contiguous();
  constexpr int64_t kMaxGridQueries = 65535;
  for (int64_t q0 = 0; q0 < nq; q0 += kMaxGridQueries) {
    const int64_t count = std::min(kMaxGridQueries, nq - q0);
    at::Tensor part = scores.narrow(0, q0, count);  // contiguous: whole rows
    launch_chunk(luts.narrow(0, q0, count), codes, 0, N, part, nullptr);
  }
  return scores;
}

}  // namespace

TORCH_LIBRARY_IMPL(opqn_ext, CUDA, m) {
  m.impl("adc_topk", &adc_topk_cuda);
  m.impl("adc_scores", &adc_scores_cuda);
}

}  // namespace opqn::cuda
