// A CUDA emulator for the tests: compiles opqn_ext's kernels (csrc/cuda/*_kernels.cuh) as host C++
// and runs every thread of a launch as a fiber, one block at a time, so that the kernels' indexing,
// shared-memory use, barriers and warp collectives are exercised on machines without a GPU.
//
// What it checks, beyond the results the tests compare:
// - every thread of a block reaches the same __syncthreads, and none has exited while others wait;
// - the lanes named in a warp collective's mask all reach the same collective;
// - a deadlock (threads waiting that can never be released) is reported, not hung on, and so is a
//   block that keeps synchronizing without end;
// - shared memory fits the launch's limit (48 KiB, or the opt-in maximum when the host raises it);
// - global buffers (DeviceBuffer) and shared memory end at a guard page, fiber stacks start at one:
//   an access past their end is reported as an error of the launch, naming the buffer;
// - shared memory starts filled with 0xFF bytes (NaN as floats), so reading it before writing it
//   shows up in the results;
// - undefined behaviour in kernel code built with -fsanitize=undefined and traps (the tests build it
//   so) is reported as an error of the launch, as are other SIGILL, SIGBUS and SIGFPE faults.
// - threads run one after another between synchronization points, in ascending, descending or
//   shuffled order (set_schedule): a kernel whose results change with the order has a data race.
// What it does not model: true concurrency (a race that no order exposes stays hidden), the memory
// model, FMA contraction.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace opqn_emu {

// The order in which the threads of a block run up to their next synchronization point.
enum class Schedule { kAscending = 0, kDescending = 1, kShuffled = 2 };
void set_schedule(Schedule schedule);

const dim3& thread_index();
const dim3& block_index();
const dim3& block_dim();
const dim3& grid_dim();

void sync_threads(const char* file, int line);

// A warp collective `name` over the lanes of `mask`, each passing `value`: kShuffleXor gives every
// lane the value of lane (lane ^ lane_mask), kMatchAny the mask of the lanes whose value equals its own.
enum class WarpOp { kShuffleXor, kMatchAny };
uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, int lane_mask, const char* name,
                         const char* file, int line);

template <class T>
T shuffle_xor(unsigned mask, T value, int lane_mask, const char* file, int line) {
  static_assert(sizeof(T) <= sizeof(uint64_t));
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = warp_collective(WarpOp::kShuffleXor, mask, bits, lane_mask, "__shfl_xor_sync", file, line);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

template <class T>
unsigned match_any(unsigned mask, T value, const char* file, int line) {
  static_assert(sizeof(T) <= sizeof(uint64_t));
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  return static_cast<unsigned>(warp_collective(WarpOp::kMatchAny, mask, bits, 0, "__match_any_sync", file, line));
}

// Threads run one at a time between synchronization points: a read-modify-write is atomic.
inline unsigned atomic_add(unsigned* address, unsigned value) {
  const unsigned old = *address;
  *address = old + value;
  return old;
}

// The current block's shared variable number `id` of `bytes`, and its dynamic shared memory.
void* shared_variable(int id, size_t bytes);
void* dynamic_shared();

struct LaunchConfig {
  dim3 grid, block;
  size_t dynamic_shared_bytes = 0;
  bool shared_opt_in = false;  // the host raised the kernel's dynamic shared memory limit
};

// Runs body() as every thread of every block of config; "" when all went well, else the error.
std::string run(const LaunchConfig& config, const std::function<void()>& body);

template <class Kernel, class... Args>
std::string launch(const LaunchConfig& config, Kernel kernel, Args... args) {
  return run(config, [&] { kernel(args...); });
}

// Memory a kernel can address, ending at a guard page; `name` appears in out-of-bounds reports.
class DeviceBuffer {
 public:
  DeviceBuffer(const char* name, size_t bytes, const void* init = nullptr);
  ~DeviceBuffer();
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  template <class T>
  T* as() const { return static_cast<T*>(data_); }
  void copy_to(void* host) const;

 private:
  void* region_;
  size_t bytes_;
  void* data_;
};

}  // namespace opqn_emu

#define threadIdx (::opqn_emu::thread_index())
#define blockIdx (::opqn_emu::block_index())
#define blockDim (::opqn_emu::block_dim())
#define gridDim (::opqn_emu::grid_dim())
#define __syncthreads() ::opqn_emu::sync_threads(__FILE__, __LINE__)
#define __shfl_xor_sync(mask, value, lane_mask) \
  ::opqn_emu::shuffle_xor(mask, value, lane_mask, __FILE__, __LINE__)
#define __match_any_sync(mask, value) ::opqn_emu::match_any(mask, value, __FILE__, __LINE__)
#define atomicAdd(address, value) ::opqn_emu::atomic_add(address, value)
#define __ffs(x) __builtin_ffs(x)
#define __popc(x) __builtin_popcount(x)
#define OPQN_SHARED(type, name) \
  type& name = *static_cast<type*>(::opqn_emu::shared_variable(__COUNTER__, sizeof(type)))
#define OPQN_DYNAMIC_SHARED(type, name) type* const name = static_cast<type*>(::opqn_emu::dynamic_shared())
