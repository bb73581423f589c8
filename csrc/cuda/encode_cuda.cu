// Host side of the CUDA encode (kernel: encode_kernels.cuh): checks, output and launch.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/encode_kernels.cuh"
#include "cuda/shared_limit.h"
#include "encode.h"

namespace opqn::cuda {
namespace {

static_assert(kMaxWords <= kThreads, "the tile product gives every word a thread");

at::Tensor encode_cuda(const at::Tensor& x_in, const at::Tensor& assign_weight, bool normalize) {
  const auto dims = check_encode_args(x_in, assign_weight);
  (void)normalize;  // a positive scale per row: the argmax does not change
  const auto [B, M, d, K] = dims;
  TORCH_CHECK(d <= kEncodeMaxDim, "encode on CUDA supports d up to ", kEncodeMaxDim, ", got d=", d);
  TORCH_CHECK(M <= 65535, "encode on CUDA supports up to 65535 books, got M=", M);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor A = assign_weight.contiguous();
  at::Tensor codes = at::empty({B, M}, x.options().dtype(at::kByte));
  if (B == 0) return codes;
  at::Tensor nonfinite = at::zeros({1}, x.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "encode_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const size_t smem = encode_shared_bytes<acc_t>(d, K);
    const auto kernel = encode_kernel<scalar_t, acc_t>;
    allow_shared_bytes(kernel, smem);
    kernel<<<encode_grid(B, M), kThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<scalar_t>(), A.const_data_ptr<scalar_t>(), codes.mutable_data_ptr<uint8_t>(),
        nonfinite.mutable_data_ptr<int>(), B, M, d, K);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  check_similarities_finite(nonfinite.item<int>() == 0);  // waits for the kernel
  return codes;
}

}  // namespace

TORCH_LIBRARY_IMPL(opqn_ext, CUDA, m) { m.impl("encode", &encode_cuda); }

}  // namespace opqn::cuda
