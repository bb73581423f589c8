// Host side: the opt-in that lets a kernel use more than 48 KiB of shared memory per block.
#pragma once

#include <cstddef>

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include "cuda/cuda_utils.cuh"

namespace opqn::cuda {

// Raises kernel's dynamic shared memory limit to dynamic_bytes where dynamic_bytes plus the
// kernel's static shared memory exceed the default limit.
template <typename Kernel>
void allow_shared_bytes(Kernel kernel, size_t dynamic_bytes, size_t static_bytes = 0) {
  if (dynamic_bytes + static_bytes <= kSharedWithoutOptIn) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(dynamic_bytes)));
}

}  // namespace opqn::cuda
