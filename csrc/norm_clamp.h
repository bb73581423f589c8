// The norm clamp of normalize=True, shared by the CPU and CUDA kernels.
#pragma once

namespace opqn {

// eps of the norm clamp: xhat = x / max(||x||, eps), as torch.nn.functional.normalize.
constexpr double kNormEps = 1e-12;

}  // namespace opqn
