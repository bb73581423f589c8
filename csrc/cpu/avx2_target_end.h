// Ends the AVX2+FMA region opened by avx2_target_begin.h.
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
