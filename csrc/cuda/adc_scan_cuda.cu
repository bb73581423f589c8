// Host side of the CUDA adc_topk, adc_topk4 and adc_scores (kernels: adc_scan_kernels.cuh): chunks
// of the database, kernel variants by table size, and the merge of the chunks' top-k.
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
#include "cuda/adc_scan_kernels.cuh"

namespace opqn::cuda {
namespace {

constexpr int64_t kChunkElements = int64_t(1) << 24;  // keys or candidates of one chunk: 128 MiB

// The kernel launch of one of the scan kernel templates: calls launch(kernel, dynamic shared
// memory) with the variant whose table of `entries` floats lives in shared memory (up to 48 KiB) or
// in global memory, after raising the kernel's shared memory limit where it needs more than 48 KiB.
template <class Launch, class SharedKernel, class GlobalKernel>
void launch_variant(int64_t entries, size_t static_smem, SharedKernel shared_kernel, GlobalKernel global_kernel,
                    const Launch& launch) {
  if (!lut_in_shared(entries)) {
    launch(global_kernel, size_t(0));
    return;
  }
  const size_t smem = lut_shared_bytes(entries);
  if (smem + static_smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(shared_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  }
  launch(shared_kernel, smem);
}

// Scores codes [first, first + count) for every query of luts [nq <= 65535, M, stride] into scores
// [nq, count] and/or signed rank keys [nq, count] (either may be null).
template <class Codes>
void launch_dense(const at::Tensor& luts, const Codes& codes, int64_t first, int64_t count, float* scores,
                  int64_t* keys) {
  const dim3 grid = dense_grid(count, luts.size(0));
  launch_variant(luts.size(1) * luts.size(2), 0, adc_dense_kernel<true, Codes>, adc_dense_kernel<false, Codes>,
                 [&](auto kernel, size_t smem) {
                   kernel<<<grid, kThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(
                       luts.const_data_ptr<float>(), codes, luts.size(1), first, count, scores, keys);
                   C10_CUDA_KERNEL_LAUNCH_CHECK();
                 });
}

// The signed rank keys of the min(k, count) best codes of [first, first + count) per query,
// best first: [nq, min(k, count)].
template <class Codes>
at::Tensor chunk_top_keys(const at::Tensor& luts, const Codes& codes, int64_t first, int64_t count, int64_t k) {
  const int64_t nq = luts.size(0);
  const auto long_options = luts.options().dtype(at::kLong);
  at::Tensor keys;
  if (k <= kMaxSelectK) {
    const int64_t blocks = ceil_div(count, kBlockCodes);
    keys = at::empty({nq, blocks * k}, long_options);  // [nq, blocks, k] candidates
    const dim3 grid = select_grid(count, nq);
    launch_variant(luts.size(1) * luts.size(2), sizeof(BlockSelect), adc_select_kernel<true, Codes>,
                   adc_select_kernel<false, Codes>, [&](auto kernel, size_t smem) {
                     kernel<<<grid, kThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(
                         luts.const_data_ptr<float>(), codes, luts.size(1), first, count,
                         static_cast<uint32_t>(k), keys.mutable_data_ptr<int64_t>());
                     C10_CUDA_KERNEL_LAUNCH_CHECK();
                   });
  } else {
    keys = at::empty({nq, count}, long_options);
    launch_dense(luts, codes, first, count, nullptr, keys.mutable_data_ptr<int64_t>());
  }
  return std::get<0>(keys.topk(std::min(k, count), 1, true, true));
}

// The top-k of N codes for every query of lut [nq, M, K <= Codes::kLutStride] (validated): scores
// [nq, k] descending, indices [nq, k], ties by smaller index.
template <class Codes>
std::tuple<at::Tensor, at::Tensor> scan_topk(const at::Tensor& lut, const Codes& codes, int64_t N, int64_t k) {
  const int64_t nq = lut.size(0);
  TORCH_CHECK(nq <= 65535, "adc_topk on CUDA takes up to 65535 queries per call, got ", nq,
              " (split the queries into batches)");
  if (nq == 0) {
    return {at::empty({0, k}, lut.options()), at::empty({0, k}, lut.options().dtype(at::kLong))};
  }
  const at::Tensor luts = pad_lut(lut.contiguous(), Codes::kLutStride);  // [nq, M, stride]
  // Codes per chunk: the chunk's candidates (select path) or keys (dense path) stay within
  // kChunkElements, or the size of the results where those are larger; the first chunk holds at
  // least k codes.
  const int64_t per_chunk = k <= kMaxSelectK ? kBlockCodes * std::max<int64_t>(1, kChunkElements / (nq * k))
                                             : std::max(k, kChunkElements / nq);
  const int64_t chunk = std::min({N, per_chunk, static_cast<int64_t>(kMaxPosition) + 1});
  at::Tensor best_scores, best_indices;
  for (int64_t first = 0; first < N; first += chunk) {
    const int64_t count = std::min(chunk, N - first);
    const at::Tensor top = chunk_top_keys(luts, codes, first, count, k);
    at::Tensor chunk_scores = at::empty(top.sizes(), lut.options());
    at::Tensor chunk_indices = at::empty(top.sizes(), top.options());
    const int64_t n = top.numel();
    decode_keys_kernel<<<static_cast<unsigned>(ceil_div(n, kThreads)), kThreads, 0,
                         c10::cuda::getCurrentCUDAStream()>>>(
        top.const_data_ptr<int64_t>(), n, first, chunk_scores.mutable_data_ptr<float>(),
        chunk_indices.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
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

// f(RowCodes<kWords>{...}) for codes [N, M] (contiguous), with word reads where they are aligned.
template <class F>
auto with_row_codes(const at::Tensor& codes, const F& f) {
  const uint8_t* ptr = codes.const_data_ptr<uint8_t>();
  const int64_t M = codes.size(1);
  if (M % 4 == 0 && reinterpret_cast<uintptr_t>(ptr) % 4 == 0) return f(RowCodes<true>{ptr, M});
  return f(RowCodes<false>{ptr, M});
}

std::tuple<at::Tensor, at::Tensor> adc_topk_cuda(const at::Tensor& lut, const at::Tensor& codes_in, int64_t k) {
  const auto [nq, M, K, N] = check_adc_args(lut, codes_in, k);
  const c10::cuda::CUDAGuard guard(lut.device());
  const at::Tensor codes = codes_in.contiguous();
  return with_row_codes(codes, [&](const auto& rows) { return scan_topk(lut, rows, N, k); });
}

std::tuple<at::Tensor, at::Tensor> adc_topk4_cuda(const at::Tensor& lut, const at::Tensor& packed_in,
                                                  int64_t num_codes, int64_t k, int64_t rerank) {
  check_adc4_args(lut, packed_in, num_codes, k, rerank);
  const c10::cuda::CUDAGuard guard(lut.device());
  const at::Tensor packed = packed_in.contiguous();
  return scan_topk(lut, PackedCodes4{packed.const_data_ptr<uint8_t>(), lut.size(1), packed.size(1)}, num_codes, k);
}

at::Tensor adc_scores_cuda(const at::Tensor& lut, const at::Tensor& codes_in) {
  const auto [nq, M, K, N] = check_lut_and_codes(lut, codes_in);
  const c10::cuda::CUDAGuard guard(lut.device());
  at::Tensor scores = at::empty({nq, N}, lut.options());  // [nq, N]
  if (nq == 0 || N == 0) return scores;
  const at::Tensor luts = pad_lut(lut.contiguous());
  const at::Tensor codes = codes_in.contiguous();
  constexpr int64_t kMaxGridQueries = 65535;
  with_row_codes(codes, [&](const auto& rows) {
    for (int64_t q0 = 0; q0 < nq; q0 += kMaxGridQueries) {
      const int64_t count = std::min(kMaxGridQueries, nq - q0);
      at::Tensor part = scores.narrow(0, q0, count);  // contiguous: whole rows
      launch_dense(luts.narrow(0, q0, count), rows, 0, N, part.mutable_data_ptr<float>(), nullptr);
    }
  });
  return scores;
}

}  // namespace

TORCH_LIBRARY_IMPL(opqn_ext, CUDA, m) {
  m.impl("adc_topk", &adc_topk_cuda);
  m.impl("adc_topk4", &adc_topk4_cuda);
  m.impl("adc_scores", &adc_scores_cuda);
}

}  // namespace opqn::cuda
