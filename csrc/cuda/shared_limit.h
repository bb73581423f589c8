// Host side: the opt-in that lets a kernel use more than 48 KiB of shared memory per block.
#pragma once

#include <cstddef>
#include <map>
#include <mutex>
#include <utility>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <cuda_runtime.h>

#include "cuda/cuda_utils.cuh"

namespace opqn::cuda {

// Raises kernel's dynamic shared memory limit on the current device to dynamic_bytes where
// dynamic_bytes plus the kernel's static shared memory exceed the default limit. The runtime call
// is made once per kernel, device and larger size: later launches find the limit already raised.
template <typename Kernel>
void allow_shared_bytes(Kernel kernel, size_t dynamic_bytes, size_t static_bytes = 0) {
  if (dynamic_bytes + static_bytes <= kSharedWithoutOptIn) return;
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, size_t> raised;  // (kernel, device) -> bytes allowed
  const std::pair<const void*, int> key(reinterpret_cast<const void*>(kernel), c10::cuda::current_device());
  const std::lock_guard<std::mutex> lock(mutex);
  size_t& allowed = raised[key];
  if (dynamic_bytes <= allowed) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(dynamic_bytes)));
  allowed = dynamic_bytes;
}

}  // namespace opqn::cuda
