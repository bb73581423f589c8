// Kernels with the mistakes the CUDA emulator must report, one per case, so the tests can check
// that each check of the emulator fires (a check that cannot fail would prove nothing).
#include <cstdint>
#include <cstdio>
#include <string>

#include "cuda_emulator.h"

namespace {

constexpr int kThreads = 64;

__global__ void divergent_barrier_kernel() {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
}

__global__ void exit_before_barrier_kernel() {
  if (threadIdx.x == 5) return;
  __syncthreads();
}

__global__ void shuffle_with_exited_lane_kernel(float* out) {
  if (threadIdx.x == 3) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

__global__ void shared_overflow_kernel(float* out) {
  OPQN_DYNAMIC_SHARED(float, buffer);
  buffer[threadIdx.x] = 1.0f;  // the launch gives kThreads / 2 floats
  __syncthreads();
  out[threadIdx.x] = buffer[threadIdx.x];
}

__global__ void global_overflow_kernel(float* out) { out[threadIdx.x + 1] = 0.0f; }

__global__ void uninitialized_shared_kernel(float* out) {
  OPQN_DYNAMIC_SHARED(float, buffer);
  if (threadIdx.x > 0) buffer[threadIdx.x] = 1.0f;  // thread 0 forgets its entry
  __syncthreads();
  out[threadIdx.x] = buffer[(threadIdx.x + 1) % kThreads];
}

__global__ void racy_kernel(float* out) {
  OPQN_DYNAMIC_SHARED(float, buffer);
  buffer[threadIdx.x] = static_cast<float>(threadIdx.x);  // no __syncthreads before the neighbour's read
  out[threadIdx.x] = buffer[(threadIdx.x + 1) % kThreads];
}

__global__ void shift_overflow_kernel(float* out, int extra) {
  const uint64_t mask = ~uint64_t(0) << (56 + extra);  // extra = 8: a shift by the full width
  out[threadIdx.x] = static_cast<float>(mask >> 60);
}

__global__ void float_to_int_overflow_kernel(float* out, float scale) {
  out[threadIdx.x] = static_cast<float>(static_cast<int32_t>(scale * 3e9f));  // scale = 1: past INT32_MAX
}

__global__ void warp_sum_kernel(float* out) {
  float v = static_cast<float>(threadIdx.x);
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  out[threadIdx.x] = v;
}

}  // namespace

extern "C" {

// Runs self-test case `which` and writes its error (or "") into message [capacity]; out receives
// the kernel's kThreads floats where it writes any. Returns kThreads.
int emu_selftest(int which, char* message, int capacity, float* out) {
  using opqn_emu::DeviceBuffer;
  using opqn_emu::LaunchConfig;
  DeviceBuffer buffer("out", kThreads * sizeof(float));
  const LaunchConfig config{dim3(2), dim3(kThreads)};
  std::string error;
  switch (which) {
    case 0: error = opqn_emu::launch(config, divergent_barrier_kernel); break;
    case 1: error = opqn_emu::launch(config, exit_before_barrier_kernel); break;
    case 2: error = opqn_emu::launch(config, shuffle_with_exited_lane_kernel, buffer.as<float>()); break;
    case 3: {
      const LaunchConfig half{dim3(1), dim3(kThreads), kThreads / 2 * sizeof(float)};
      error = opqn_emu::launch(half, shared_overflow_kernel, buffer.as<float>());
      break;
    }
    case 4: error = opqn_emu::launch(config, global_overflow_kernel, buffer.as<float>()); break;
    case 5: {
      const LaunchConfig shared{dim3(1), dim3(kThreads), kThreads * sizeof(float)};
      error = opqn_emu::launch(shared, uninitialized_shared_kernel, buffer.as<float>());
      break;
    }
    case 6: {
      const LaunchConfig too_much{dim3(1), dim3(kThreads), 49 * 1024};
      error = opqn_emu::launch(too_much, uninitialized_shared_kernel, buffer.as<float>());
      break;
    }
    case 7: error = opqn_emu::launch(config, warp_sum_kernel, buffer.as<float>()); break;
    case 8: {
      const LaunchConfig shared{dim3(1), dim3(kThreads), kThreads * sizeof(float)};
      error = opqn_emu::launch(shared, racy_kernel, buffer.as<float>());
      break;
    }
    case 9: error = opqn_emu::launch(config, shift_overflow_kernel, buffer.as<float>(), 8); break;
    case 10: error = opqn_emu::launch(config, float_to_int_overflow_kernel, buffer.as<float>(), 1.0f); break;
    default: error = "unknown case";
  }
  buffer.copy_to(out);
  std::snprintf(message, static_cast<size_t>(capacity), "%s", error.c_str());
  return kThreads;
}

}  // extern "C"
