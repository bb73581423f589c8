// Compiles the functions that follow, up to avx512_target_end.h, for AVX-512 F/BW/VBMI (with
// AVX2, FMA and BMI2, which every such CPU has). Include it after every other header, so that no
// inline code of those headers is built for AVX-512 (the linker could then pick that copy for the
// baseline build). No include guard: each AVX-512 file includes it once.
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vbmi,avx2,fma,bmi2"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vbmi,avx2,fma,bmi2")
#endif
