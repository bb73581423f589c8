// The launches of the adc scan kernels in the emulator as adc_scan_cuda.cu's launch_variant makes
// them: the table in shared memory when it fits (or, for the tests, forced into or out of it), with
// the opt-in to more than 48 KiB of shared memory where the host code raises the kernel's limit.
#pragma once

#include <cstdint>
#include <string>

#include "cuda/adc_scan_kernels.cuh"
#include "cuda_emulator.h"

namespace opqn_emu {

enum LutPlacement { kAsTheHostDecides = 0, kForceShared = 1, kForceGlobal = 2 };

// The config of a launch over a table of `entries` floats; shared: the kernel variant that stages
// the table in shared memory.
inline LaunchConfig adc_config(dim3 grid, int64_t entries, size_t static_smem, int placement, bool& shared) {
  shared = placement == kAsTheHostDecides ? opqn::cuda::lut_in_shared(entries) : placement == kForceShared;
  const size_t smem = shared ? static_cast<size_t>(entries) * sizeof(float) : 0;
  return LaunchConfig{grid, dim3(opqn::cuda::kThreads), smem, smem + static_smem > opqn::cuda::kSharedWithoutOptIn};
}

// adc_dense_kernel over luts [nq, M, Codes::kLutStride] and codes [first, first + count); "" or the error.
template <class Codes>
std::string launch_adc_dense(int placement, const float* luts, int64_t nq, const Codes& codes, int64_t M,
                             int64_t first, int64_t count, float* scores, int64_t* keys) {
  bool shared = false;
  const LaunchConfig config =
      adc_config(opqn::cuda::dense_grid(count, nq), M * Codes::kLutStride, 0, placement, shared);
  const auto kernel = shared ? opqn::cuda::adc_dense_kernel<true, Codes> : opqn::cuda::adc_dense_kernel<false, Codes>;
  return launch(config, kernel, luts, codes, M, first, count, scores, keys);
}

// adc_select_kernel, as launch_adc_dense -> candidates [nq, blocks, k]
template <class Codes>
std::string launch_adc_select(int placement, const float* luts, int64_t nq, const Codes& codes, int64_t M,
                              int64_t first, int64_t count, int64_t k, int64_t* candidates) {
  bool shared = false;
  const LaunchConfig config = adc_config(opqn::cuda::select_grid(count, nq), M * Codes::kLutStride,
                                         sizeof(opqn::cuda::BlockSelect), placement, shared);
  const auto kernel =
      shared ? opqn::cuda::adc_select_kernel<true, Codes> : opqn::cuda::adc_select_kernel<false, Codes>;
  return launch(config, kernel, luts, codes, M, first, count, static_cast<uint32_t>(k), candidates);
}

}  // namespace opqn_emu
