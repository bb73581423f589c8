// Small device helpers shared by the CUDA kernels. The kernels are written so that the CUDA
// emulator of the tests (python_tests/cuda_emulation) can compile and run them on the host: with
// OPQN_CUDA_EMULATION defined, the emulator provides the CUDA built-ins and the shared-memory
// declarations below.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(OPQN_CUDA_EMULATION)
#include "cuda_emulator.h"
#else
#include <cuda_runtime.h>
// A block's shared variable, and its dynamic shared memory viewed as an array of type.
#define OPQN_SHARED(type, name) __shared__ type name
#define OPQN_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#endif

namespace opqn::cuda {

constexpr int kWarp = 32;
constexpr int kThreads = 256;  // threads per block of every kernel
constexpr int kWarps = kThreads / kWarp;
constexpr size_t kSharedWithoutOptIn = 48 * 1024;  // a block's shared memory unless the host raises it

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const T other = __shfl_xor_sync(0xffffffffu, v, offset);
    v = other > v ? other : v;
  }
  return v;
}

__device__ __forceinline__ float exp_of(float x) { return expf(x); }
__device__ __forceinline__ double exp_of(double x) { return exp(x); }
__device__ __forceinline__ float log_of(float x) { return logf(x); }
__device__ __forceinline__ double log_of(double x) { return log(x); }
__device__ __forceinline__ float sqrt_of(float x) { return sqrtf(x); }
__device__ __forceinline__ double sqrt_of(double x) { return sqrt(x); }
#if defined(OPQN_CUDA_EMULATION)
template <typename T>
__device__ __forceinline__ bool finite_of(T x) { return std::isfinite(x); }
#else
template <typename T>
__device__ __forceinline__ bool finite_of(T x) { return isfinite(x); }
#endif

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace opqn::cuda
