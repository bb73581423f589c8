// The launch of an adc scan kernel in the emulator as adc_scan_cuda.cu's launch_variant makes it:
// the table in shared memory when it fits (or, for the tests, forced into or out of it), with the
// opt-in to more than 48 KiB of shared memory where the host code raises the kernel's limit.
#pragma once

#include <cstdint>

#include "cuda/adc_scan_kernels.cuh"
#include "cuda_emulator.h"

namespace opqn_emu {

enum LutPlacement { kAsTheHostDecides = 0, kForceShared = 1, kForceGlobal = 2 };

struct AdcLaunch {
  LaunchConfig config;
  bool shared_lut;  // which kernel variant: <true> stages the table in shared memory
};

inline AdcLaunch adc_launch(dim3 grid, int64_t entries, size_t static_smem, int placement) {
  const bool shared = placement == kAsTheHostDecides ? opqn::cuda::lut_in_shared(entries) : placement == kForceShared;
  const size_t smem = shared ? static_cast<size_t>(entries) * sizeof(float) : 0;
  return {LaunchConfig{grid, dim3(opqn::cuda::kThreads), smem, smem + static_smem > 48 * 1024}, shared};
}

}  // namespace opqn_emu
