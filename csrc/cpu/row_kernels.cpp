#include "cpu/row_kernels.h"

#include "cpu/cpu_isa.h"

namespace opqn::cpu {

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
