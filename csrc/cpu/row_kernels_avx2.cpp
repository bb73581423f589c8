// The AVX2+FMA build of the row kernels; used only when the CPU has both (cpu_isa.h).
#if defined(__x86_64__) || defined(__i386__)
#include <cstdint>

#include "cpu/row_kernels.h"

#include "cpu/avx2_target_begin.h"
#define OPQN_ISA avx2
#include "cpu/row_kernels_impl.h"
#include "cpu/avx2_target_end.h"
#endif
