// Host side of the CUDA adc_topk, adc_topk4 and adc_scores: the kernel launches (kernels:
// adc_scan_kernels.cuh) with their variants by table size, for the chunked top-k of adc_scan_topk.h.
#include <algorithm>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "adc.h"
#include "cuda/adc_scan_kernels.cuh"
#include "cuda/adc_scan_topk.h"
#include "cuda/shared_limit.h"

namespace opqn::cuda {
namespace {

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
  allow_shared_bytes(shared_kernel, smem, static_smem);
  launch(shared_kernel, smem);
}

// Scores codes [first, first + count) for every query of luts [nq <= kMaxGridQueries, M, stride]
// into scores [nq, count] and/or signed rank keys [nq, count] (either may be null).
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

// The launcher of scan_topk (adc_scan_topk.h): the kernels on the current stream.
struct CudaLauncher {
  template <class Codes>
  void select(const at::Tensor& luts, const Codes& codes, int64_t first, int64_t count, int64_t k,
              int64_t* candidates) const {
    const dim3 grid = select_grid(count, luts.size(0));
    launch_variant(luts.size(1) * luts.size(2), sizeof(BlockSelect), adc_select_kernel<true, Codes>,
                   adc_select_kernel<false, Codes>, [&](auto kernel, size_t smem) {
                     kernel<<<grid, kThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(
                         luts.const_data_ptr<float>(), codes, luts.size(1), first, count,
                         static_cast<uint32_t>(k), candidates);
                     C10_CUDA_KERNEL_LAUNCH_CHECK();
                   });
  }

  template <class Codes>
  void dense(const at::Tensor& luts, const Codes& codes, int64_t first, int64_t count, float* scores,
             int64_t* keys) const {
    launch_dense(luts, codes, first, count, scores, keys);
  }

  void decode(const int64_t* top, int64_t n, int64_t first, float* scores, int64_t* indices) const {
    decode_keys_kernel<<<static_cast<unsigned>(ceil_div(n, kThreads)), kThreads, 0,
                         c10::cuda::getCurrentCUDAStream()>>>(top, n, first, scores, indices);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

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
  return with_row_codes(codes, [&](const auto& rows) { return scan_topk(CudaLauncher{}, lut, rows, N, k); });
}

std::tuple<at::Tensor, at::Tensor> adc_topk4_cuda(const at::Tensor& lut, const at::Tensor& packed_in,
                                                  int64_t num_codes, int64_t k, int64_t rerank) {
  check_adc4_args(lut, packed_in, num_codes, k, rerank);
  const c10::cuda::CUDAGuard guard(lut.device());
  const at::Tensor packed = packed_in.contiguous();
  const PackedCodes4 codes{packed.const_data_ptr<uint8_t>(), lut.size(1), packed.size(1)};
  return scan_topk(CudaLauncher{}, lut, codes, num_codes, k);
}

at::Tensor adc_scores_cuda(const at::Tensor& lut, const at::Tensor& codes_in) {
  const auto [nq, M, K, N] = check_lut_and_codes(lut, codes_in);
  const c10::cuda::CUDAGuard guard(lut.device());
  at::Tensor scores = at::empty({nq, N}, lut.options());  // [nq, N]
  if (nq == 0 || N == 0) return scores;
  const at::Tensor luts = pad_lut(lut.contiguous());
  const at::Tensor codes = codes_in.contiguous();
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
