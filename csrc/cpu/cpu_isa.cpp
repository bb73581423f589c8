#include "cpu/cpu_isa.h"

#include <atomic>
#include <cstdlib>

#include <c10/util/Exception.h>

namespace opqn::cpu {
namespace {

bool cpu_has_avx2() {
#if defined(__x86_64__) || defined(__i386__)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

// The AVX-512 kernels' byte permutes need VBMI; BMI2 comes with every CPU that has it.
bool cpu_has_avx512() {
#if defined(__x86_64__) || defined(__i386__)
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("bmi2");
#else
  return false;
#endif
}

CpuIsa parse_isa(const std::string& name, const char* source) {
  if (name == "scalar") return CpuIsa::Scalar;
  if (name == "avx2") {
    TORCH_CHECK(cpu_has_avx2(), source, "=avx2 but this CPU has no AVX2+FMA");
    return CpuIsa::Avx2;
  }
  if (name == "avx512") {
    TORCH_CHECK(cpu_has_avx512(), source, "=avx512 but this CPU lacks AVX-512 F/BW/VBMI");
    return CpuIsa::Avx512;
  }
  TORCH_CHECK(false, source, " must be 'scalar', 'avx2' or 'avx512', got '", name, "'");
}

CpuIsa best_isa() {
  if (cpu_has_avx512()) return CpuIsa::Avx512;
  return cpu_has_avx2() ? CpuIsa::Avx2 : CpuIsa::Scalar;
}

CpuIsa initial_isa() {
  if (const char* forced = std::getenv("OPQN_CPU_ISA"); forced != nullptr && *forced != '\0') {
    return parse_isa(forced, "OPQN_CPU_ISA");
  }
  return best_isa();
}

std::atomic<int>& isa_slot() {
  static std::atomic<int> slot{static_cast<int>(initial_isa())};
  return slot;
}

}  // namespace

std::vector<std::string> available_cpu_isas() {
  std::vector<std::string> isas{"scalar"};
  if (cpu_has_avx2()) isas.emplace_back("avx2");
  if (cpu_has_avx512()) isas.emplace_back("avx512");
  return isas;
}

CpuIsa active_cpu_isa() { return static_cast<CpuIsa>(isa_slot().load(std::memory_order_relaxed)); }

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::Avx512: return "avx512";
    case CpuIsa::Avx2: return "avx2";
    default: return "scalar";
  }
}

void set_cpu_isa(const std::string& name) {
  isa_slot().store(static_cast<int>(parse_isa(name, "cpu isa")), std::memory_order_relaxed);
}

}  // namespace opqn::cpu
