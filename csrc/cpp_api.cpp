// The C++ API of opqn_ext/ops.h: each op's function calls its schema through the dispatcher; the
// build's facts come from the CPU dispatch and the build flags.
#include <ATen/core/dispatch/Dispatcher.h>

#include "cpu/cpu_isa.h"
#include "opqn_ext/ops.h"

namespace opqn_ext {
namespace {

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

}  // namespace

SoftQuantizeResult soft_quantize(const at::Tensor& x, const at::Tensor& assign_weight, const at::Tensor& codebook,
                                 double scale, bool normalize) {
  static const auto handle = op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, double, bool)>("opqn_ext::soft_quantize");
  auto [probs, quantized, entropy] = handle.call(x, assign_weight, codebook, scale, normalize);
  return {probs, quantized, entropy};
}

at::Tensor encode(const at::Tensor& x, const at::Tensor& assign_weight, bool normalize) {
  static const auto handle = op<at::Tensor(const at::Tensor&, const at::Tensor&, bool)>("opqn_ext::encode");
  return handle.call(x, assign_weight, normalize);
}

std::tuple<at::Tensor, at::Tensor> adc_topk(const at::Tensor& lut, const at::Tensor& codes, int64_t k) {
  static const auto handle =
      op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, int64_t)>("opqn_ext::adc_topk");
  return handle.call(lut, codes, k);
}

at::Tensor adc_scores(const at::Tensor& lut, const at::Tensor& codes) {
  static const auto handle = op<at::Tensor(const at::Tensor&, const at::Tensor&)>("opqn_ext::adc_scores");
  return handle.call(lut, codes);
}

PackedCodes4 pack_codes4(const at::Tensor& codes) {
  static const auto handle = op<at::Tensor(const at::Tensor&)>("opqn_ext::pack_codes4");
  return {handle.call(codes), codes.size(0)};  // the call checks codes first
}

std::tuple<at::Tensor, at::Tensor> adc_topk4(const at::Tensor& lut, const PackedCodes4& packed, int64_t k,
                                             int64_t rerank) {
  static const auto handle = op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, int64_t,
                                                                   int64_t, int64_t)>("opqn_ext::adc_topk4");
  return handle.call(lut, packed.data, packed.num_codes, k, rerank);
}

std::vector<std::string> available_cpu_isas() { return opqn::cpu::available_cpu_isas(); }

std::string active_cpu_isa() { return opqn::cpu::cpu_isa_name(opqn::cpu::active_cpu_isa()); }

void set_cpu_isa(const std::string& name) { opqn::cpu::set_cpu_isa(name); }

bool cuda_built() {
#ifdef OPQN_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace opqn_ext
