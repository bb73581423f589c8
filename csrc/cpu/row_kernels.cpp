#include "cpu/row_kernels.h"

#include <algorithm>

#include <ATen/Parallel.h>

#include "cpu/cpu_isa.h"

namespace opqn::cpu {

void for_sample_rows(int64_t B, int64_t M, int64_t macs_per_row, const std::function<void(int64_t, int64_t)>& fn) {
  const int64_t grain = std::max<int64_t>(1, kRowChunkMacs / std::max<int64_t>(M * macs_per_row, 1));
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) { fn(b0 * M, (b1 - b0) * M); });
}

namespace scalar {
extern const RowKernels<float> kRowKernelsFloat;
extern const RowKernels<double> kRowKernelsDouble;
}  // namespace scalar

#if defined(__x86_64__) || defined(__i386__)
namespace avx2 {
extern const RowKernels<float> kRowKernelsFloat;
extern const RowKernels<double> kRowKernelsDouble;
}  // namespace avx2
#define OPQN_PICK(name) (active_cpu_isa() >= CpuIsa::Avx2 ? avx2::name : scalar::name)
#else
#define OPQN_PICK(name) (scalar::name)
#endif

template <>
const RowKernels<float>& row_kernels<float>() {
  return OPQN_PICK(kRowKernelsFloat);
}

template <>
const RowKernels<double>& row_kernels<double>() {
  return OPQN_PICK(kRowKernelsDouble);
}

#undef OPQN_PICK

}  // namespace opqn::cpu
