// Compiles the functions that follow, up to avx2_target_end.h, for AVX2+FMA. Include it after
// every other header, so that no inline code of those headers is built for AVX2 (the linker could
// then pick that copy for the baseline build). No include guard: each AVX2 file includes it once.
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
