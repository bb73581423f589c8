// The AVX2+FMA build of the row kernels; used only when the CPU has both (cpu_isa.h).
#if defined(__x86_64__) || defined(__i386__)
#include <cstdint>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC target("avx2,fma")
#endif

#define OPQN_ISA avx2
#include "cpu/row_kernels_impl.h"

#if defined(__clang__)
#pragma clang attribute pop
#endif
#endif
