// Host side of the CUDA soft_quantize (kernels: soft_quantize_kernels.cuh): checks, outputs and
// launches, on the current stream. float16/bfloat16 inputs are computed in float32.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/shared_limit.h"
#include "cuda/soft_quantize_kernels.cuh"
#include "soft_quantize.h"

namespace opqn::cuda {
namespace {

void check_cuda_sizes(const SoftQuantizeDims& dims) {
  TORCH_CHECK(dims.d <= kSoftQuantizeMaxDim && dims.K <= kSoftQuantizeMaxDim,
              "soft_quantize on CUDA supports d and K up to ", kSoftQuantizeMaxDim, ", got d=", dims.d,
              ", K=", dims.K);
  TORCH_CHECK(dims.M <= 65535, "soft_quantize on CUDA supports up to 65535 books, got M=", dims.M);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> soft_quantize_cuda(const at::Tensor& x_in,
                                                                  const at::Tensor& assign_weight,
                                                                  const at::Tensor& codebook,
                                                                  double scale, bool normalize) {
  const auto dims = check_soft_quantize_args(x_in, assign_weight, codebook, scale);
  check_cuda_sizes(dims);
  const auto [B, M, d, K] = dims;
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor A = assign_weight.contiguous();
  const at::Tensor C = codebook.contiguous();
  at::Tensor probs = at::empty({B, M, K}, x.options());
  at::Tensor quantized = at::empty({B, M, d}, x.options());
  at::Tensor entropy = at::empty({B, M}, x.options());
  if (B == 0) return {probs, quantized, entropy};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "soft_quantize_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int tile = tile_rows<acc_t>();
    const size_t smem = forward_shared_bytes<acc_t>(d, K);
    const auto kernel = soft_quantize_forward_kernel<scalar_t, acc_t, tile>;
    allow_shared_bytes(kernel, smem);
    kernel<<<soft_quantize_grid<acc_t>(B, M), kThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(
            x.const_data_ptr<scalar_t>(), A.const_data_ptr<scalar_t>(), C.const_data_ptr<scalar_t>(),
            probs.mutable_data_ptr<scalar_t>(), quantized.mutable_data_ptr<scalar_t>(),
            entropy.mutable_data_ptr<scalar_t>(), B, M, d, K, static_cast<acc_t>(scale), normalize);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {probs, quantized, entropy};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> soft_quantize_backward_cuda(
    const c10::optional<at::Tensor>& grad_probs, const c10::optional<at::Tensor>& grad_quantized,
    const c10::optional<at::Tensor>& grad_entropy, const at::Tensor& x_in,
    const at::Tensor& assign_weight, const at::Tensor& codebook, const at::Tensor& probs_in,
    double scale, bool normalize, std::array<bool, 3> output_mask) {
  const auto in = prepare_backward_inputs(grad_probs, grad_quantized, grad_entropy, x_in,
                                          assign_weight, codebook, probs_in, scale);
  check_cuda_sizes(in.dims);
  const auto [B, M, d, K] = in.dims;
  const bool need_x = output_mask[0], need_a = output_mask[1];
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor& x = in.x;
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // g: [B, M, K] = scale * dL/dlogits / max(||x||, eps), in the accumulation dtype
  at::Tensor g = at::empty({B, M, K}, x.options().dtype(acc_dtype));
  at::Tensor grad_x = at::empty({need_x ? B : 0, M, d}, x.options());
  if (!(need_x || need_a) || B == 0) {
    g.zero_();
    return finish_backward(in, grad_x, g, x_in.sizes(), output_mask);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "soft_quantize_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int tile = tile_rows<acc_t>();
    const auto ptr = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr; };
    const size_t smem = backward_shared_bytes<acc_t>(d, K);
    const auto kernel = soft_quantize_backward_kernel<scalar_t, acc_t, tile>;
    allow_shared_bytes(kernel, smem);
    kernel<<<soft_quantize_grid<acc_t>(B, M), kThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(
            ptr(in.grad_probs), ptr(in.grad_quantized), ptr(in.grad_entropy), x.const_data_ptr<scalar_t>(),
            in.assign_weight.const_data_ptr<scalar_t>(), in.codebook.const_data_ptr<scalar_t>(),
            in.probs.const_data_ptr<scalar_t>(), g.mutable_data_ptr<acc_t>(),
            need_x ? grad_x.mutable_data_ptr<scalar_t>() : nullptr, B, M, d, K,
            static_cast<acc_t>(scale), normalize);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return finish_backward(in, grad_x, g, x_in.sizes(), output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(opqn_ext, CUDA, m) {
  m.impl("soft_quantize", &soft_quantize_cuda);
  m.impl("soft_quantize_backward", &soft_quantize_backward_cuda);
}

}  // namespace opqn::cuda
