// Autograd kernels of the ops whose outputs have no gradient (encode: argmax codes; rank_stats:
// rank counts and the precisions they give). Without one, torch's fallback runs the kernel with
// autograd still on: ATen ops called inside it with out= arguments (encode's CPU similarities)
// refused inputs that require grad, and floating outputs came back marked as requiring grad. This
// kernel runs the op below autograd, as ATen does for its own non-differentiable ops.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace opqn {
namespace {

void below_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const at::AutoDispatchBelowADInplaceOrView guard;
  op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
}

}  // namespace

TORCH_LIBRARY_IMPL(opqn_ext, Autograd, m) {
  m.impl("encode", torch::CppFunction::makeFromBoxedFunction<&below_autograd>());
  m.impl("rank_stats", torch::CppFunction::makeFromBoxedFunction<&below_autograd>());
}

}  // namespace opqn
