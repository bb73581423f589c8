// Autocast kernels: inside torch.autocast regions (CPU or CUDA), the ops' floating-point tensor
// arguments on the autocast device are cast to float32 before the op runs, as torch does for
// softmax and log: the assignments, their entropy, the argmax codes and the scanned tables keep
// float32 precision, and a backbone's bfloat16/float16 features mix with float32 weights. float64
// arguments are left as they are. One boxed kernel serves every op; it also runs under
// torch.compile, where the casts are traced like the ops.
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

namespace opqn {
namespace {

template <c10::DispatchKey kAutocastKey, c10::DeviceType kDevice>
void float32_arguments(const c10::OperatorHandle& op, c10::DispatchKeySet, torch::jit::Stack* stack) {
  const size_t num_args = op.schema().arguments().size();
  for (auto it = stack->end() - static_cast<std::ptrdiff_t>(num_args); it != stack->end(); ++it) {
    if (!it->isTensor()) continue;
    const at::Tensor& t = it->toTensor();
    if (t.defined() && t.is_floating_point() && t.scalar_type() != at::kDouble && t.device().type() == kDevice) {
      *it = t.to(at::kFloat);
    }
  }
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(kAutocastKey);
  op.callBoxed(stack);
}

constexpr const char* kFloat32Ops[] = {"soft_quantize", "encode", "adc_topk", "adc_scores", "adc_topk4", "rank_stats"};

}  // namespace

TORCH_LIBRARY_IMPL(opqn_ext, AutocastCPU, m) {
  for (const char* name : kFloat32Ops) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<
                     &float32_arguments<c10::DispatchKey::AutocastCPU, c10::DeviceType::CPU>>());
  }
}

TORCH_LIBRARY_IMPL(opqn_ext, AutocastCUDA, m) {
  for (const char* name : kFloat32Ops) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<
                     &float32_arguments<c10::DispatchKey::AutocastCUDA, c10::DeviceType::CUDA>>());
  }
}

}  // namespace opqn
