// CPU kernel of encode: codes[b, m] = argmax_k x[b, m] @ assign_weight[m] (ties to the smaller k).
// Rows go in blocks of kRowsPerBlock: one BLAS GEMM per book into a [rows, K] scratch (bounded
// memory whatever B is; up to a few dozen samples: row loops parallel over samples,
// row_kernels.h), then a parallel argmax over its rows, which also checks that every similarity is
// finite (encode.h). normalize scales each row by a positive factor, which leaves
// the argmax as it is, so it needs no work here. float16/bfloat16 inputs are encoded from float32
// copies.
#include <atomic>
#include <cmath>

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/row_kernels.h"
#include "encode.h"

namespace opqn::cpu {
namespace {

constexpr int64_t kRowsPerBlock = 4096;

// The first largest of l [K]; finite becomes false where an entry is NaN or infinite.
template <typename T>
uint8_t argmax_row(const T* l, int64_t K, bool& finite) {
  int64_t best = 0;
  for (int64_t k = 0; k < K; ++k) {
    finite &= std::isfinite(l[k]);
    best = l[k] > l[best] ? k : best;
  }
  return static_cast<uint8_t>(best);
}

at::Tensor encode_cpu(const at::Tensor& x_in, const at::Tensor& assign_weight, bool normalize) {
  const auto dims = check_encode_args(x_in, assign_weight);
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kDouble || is_half_float(x_in),
              "encode on CPU supports x of dtype float32, float64, float16 or bfloat16, got ",
              x_in.scalar_type());
  if (is_half_float(x_in)) return encode_cpu(x_in.to(at::kFloat), assign_weight.to(at::kFloat), normalize);
  const auto [B, M, d, K] = dims;
  const at::Tensor x = x_in.contiguous().view({B, M, d});
  const at::Tensor A = assign_weight.contiguous();
  at::Tensor codes = at::empty({B, M}, x.options().dtype(at::kByte));
  uint8_t* out = codes.mutable_data_ptr<uint8_t>();
  std::atomic<bool> all_finite{true};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "encode_cpu", [&] {
    if (B * M * d * K <= kRowProductsMaxMacs<scalar_t>) {
      at::Tensor l = at::empty({B * M, K}, x.options());  // [B * M, K]
      scalar_t* lp = l.mutable_data_ptr<scalar_t>();
      const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
      const scalar_t* a_ptr = A.const_data_ptr<scalar_t>();
      const auto& kernels = row_kernels<scalar_t>();
      for_sample_rows(B, M, d * K, [&](int64_t r0, int64_t rows) {
        kernels.row_products(x_ptr + r0 * d, a_ptr, rows, M, d, K, lp + r0 * K);
        bool finite = true;
        for (int64_t r = r0; r < r0 + rows; ++r) out[r] = argmax_row(lp + r * K, K, finite);
        if (!finite) all_finite.store(false, std::memory_order_relaxed);
      });
      return;
    }
    at::Tensor logits = at::empty({std::min(B, kRowsPerBlock), K}, x.options());  // [rows, K]
    for (int64_t r0 = 0; r0 < B; r0 += kRowsPerBlock) {
      const int64_t rows = std::min(kRowsPerBlock, B - r0);
      at::Tensor l = logits.narrow(0, 0, rows);
      for (int64_t m = 0; m < M; ++m) {
        at::mm_out(l, x.select(1, m).narrow(0, r0, rows), A[m]);  // [rows, K]
        const scalar_t* lp = l.const_data_ptr<scalar_t>();
        at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
          bool finite = true;
          for (int64_t r = begin; r < end; ++r) out[(r0 + r) * M + m] = argmax_row(lp + r * K, K, finite);
          if (!finite) all_finite.store(false, std::memory_order_relaxed);
        });
      }
    }
  });
  check_similarities_finite(all_finite.load());
  return codes;
}

}  // namespace

TORCH_LIBRARY_IMPL(opqn_ext, CPU, m) { m.impl("encode", &encode_cpu); }

}  // namespace opqn::cpu
