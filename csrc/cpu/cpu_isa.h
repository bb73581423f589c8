// Which CPU instruction-set path the kernels run: chosen once at first use from what the CPU
// supports (the best one), or forced with OPQN_CPU_ISA=scalar|avx2|avx512; tests switch paths with
// set_cpu_isa. The paths are ordered: a kernel without a version for the active path runs its
// best version below it (only the 8-bit and 4-bit ADC scans have AVX-512 versions; "avx512" means
// AVX-512 F, BW and VBMI, as on Ice Lake, Sapphire Rapids and Zen 4 or later).
#pragma once

#include <string>
#include <vector>

namespace opqn::cpu {

enum class CpuIsa { Scalar, Avx2, Avx512 };

// Paths this machine can run, best last ("scalar" is always there).
std::vector<std::string> available_cpu_isas();

// The path in use.
CpuIsa active_cpu_isa();
const char* cpu_isa_name(CpuIsa isa);

// Forces a path by name; raises when the name is unknown or the CPU lacks it.
void set_cpu_isa(const std::string& name);

}  // namespace opqn::cpu
