// CPU kernels of soft_quantize. Each GEMM is one batched GEMM over the books (strided views of
// the [B, M, *] tensors, no copies) on ATen's BLAS, which parallelizes it (in a forward of up to
// a few dozen samples, row loops parallel over samples: kRowProductsMaxMacs); everything between the
// GEMMs is one fused pass over the [B*M] (sample, book) rows, parallel over rows, with the
// ISA-dispatched row kernels: softmax, entropy and the norm clamp in the forward; entropy, softmax
// and norm-clamp gradients in the backward. The similarity GEMM writes straight into the probs
// output and the reconstruction GEMM reads from it, so the forward allocates nothing beyond its
// outputs (and [B, M] norms; peaked rows a transposed codebook). float16/bfloat16 inputs run the
// float32 kernels on float32 copies, and their results are rounded back. Peaked assignments (few
// words keep all but a unit roundoff of the probability) take the peaked-row products instead of
// the reconstruction and backward GEMMs (peaked_products.h).
// (Blocks of samples doing their GEMMs inside the parallel region, single-threaded BLAS each,
// measured no faster at the benchmark shapes; whole books in parallel do help: bmm_into.)
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/baddbmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/copy.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm_cpu_dispatch.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/peaked_products.h"
#include "cpu/row_kernels.h"
#include "soft_quantize.h"

namespace opqn::cpu {
namespace {

void check_cpu_dtype(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble || is_half_float(x),
              "soft_quantize on CPU supports x of dtype float32, float64, float16 or bfloat16, got ",
              x.scalar_type());
}

at::Tensor to_float(const at::Tensor& t) { return t.defined() ? t.to(at::kFloat) : t; }

c10::optional<at::Tensor> to_float(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? c10::optional<at::Tensor>(to_float(*t)) : t;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> to_dtype(std::tuple<at::Tensor, at::Tensor, at::Tensor> ts,
                                                        at::ScalarType dtype) {
  const auto cast = [dtype](const at::Tensor& t) { return t.defined() ? t.to(dtype) : t; };
  return {cast(std::get<0>(ts)), cast(std::get<1>(ts)), cast(std::get<2>(ts))};
}

// out = a @ b per batch entry (book), written through the (strided) view `out`. With at least a book
// per thread, the books' GEMMs run in parallel, single-threaded each, straight into `out`: ATen's
// bmm into a strided view took 7% longer per training step at 8 books of 64 x 64 (2 threads).
void bmm_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b) {
  const int64_t books = out.size(0);
  if (books < at::get_num_threads()) {
    at::bmm_out(out, a, b);
    return;
  }
  at::parallel_for(0, books, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      at::Tensor out_m = out.select(0, m);
      at::cpu::mm_out(out_m, a.select(0, m), b.select(0, m));  // the CPU kernel: no dispatch from workers
    }
  });
}

// [B, M, n] seen as [M, B, n]: one book's rows per batch entry.
at::Tensor by_book(const at::Tensor& t) { return t.transpose(0, 1); }

// Runs fn(first_row, rows) over [0, total) rows of `width` elements, in parallel chunks.
template <typename Fn>
void for_rows(int64_t total, int64_t width, Fn&& fn) {
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(width, 1));
  at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) { fn(begin, end - begin); });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> soft_quantize_cpu(const at::Tensor& x_in,
                                                                 const at::Tensor& assign_weight,
                                                                 const at::Tensor& codebook,
                                                                 double scale, bool normalize) {
  const auto dims = check_soft_quantize_args(x_in, assign_weight, codebook, scale);
  check_cpu_dtype(x_in);
  if (is_half_float(x_in)) {  // computed in float32, as on CUDA
    return to_dtype(soft_quantize_cpu(to_float(x_in), to_float(assign_weight), to_float(codebook), scale, normalize),
                    x_in.scalar_type());
  }
  const auto [B, M, d, K] = dims;
  const at::Tensor x = x_in.contiguous().view({B, M, d});
  const at::Tensor A = assign_weight.contiguous();
  const at::Tensor C = codebook.contiguous();
  at::Tensor probs = at::empty({B, M, K}, x.options());
  at::Tensor quantized = at::empty({B, M, d}, x.options());
  at::Tensor entropy = at::empty({B, M}, x.options());
  if (B == 0) return {probs, quantized, entropy};
  at::Tensor norms = normalize ? at::empty({B, M}, x.options()) : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "soft_quantize_cpu", [&] {
    const auto& kernels = row_kernels<scalar_t>();
    scalar_t* norms_ptr = normalize ? norms.mutable_data_ptr<scalar_t>() : nullptr;
    if (normalize) {
      const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
      for_rows(B * M, d, [&](int64_t r0, int64_t rows) {
        kernels.row_norms(x_ptr + r0 * d, rows, d, norms_ptr + r0);
      });
    }
    const bool row_loops = B * M * d * K <= kRowProductsMaxMacs<scalar_t>;
    scalar_t* p_ptr = probs.mutable_data_ptr<scalar_t>();
    // logits[b, m] = x[b, m] @ A[m], written into probs: [B, K] per book, row stride M*K
    if (row_loops) {
      const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
      const scalar_t* a_ptr = A.const_data_ptr<scalar_t>();
      for_sample_rows(B, M, d * K, [&](int64_t r0, int64_t rows) {
        kernels.row_products(x_ptr + r0 * d, a_ptr, rows, M, d, K, p_ptr + r0 * K);
      });
    } else {
      bmm_into(by_book(probs), by_book(x), A);
    }
    scalar_t* h_ptr = entropy.mutable_data_ptr<scalar_t>();
    for_rows(B * M, K, [&](int64_t r0, int64_t rows) {
      kernels.softmax_entropy_rows(p_ptr + r0 * K, rows, K, static_cast<scalar_t>(scale),
                                   norms_ptr != nullptr ? norms_ptr + r0 : nullptr, h_ptr + r0);
    });
    // quantized[b, m] = probs[b, m] @ C[m]^T
    if (use_peaked_products(probs, d)) {
      peaked_reconstruct(probs, C, quantized);
    } else if (row_loops) {
      const scalar_t* c_ptr = C.const_data_ptr<scalar_t>();
      scalar_t* q_ptr = quantized.mutable_data_ptr<scalar_t>();
      for_sample_rows(B, M, d * K, [&](int64_t r0, int64_t rows) {
        kernels.row_reconstructions(p_ptr + r0 * K, c_ptr, rows, M, d, K, q_ptr + r0 * d);
      });
    } else {
      bmm_into(by_book(quantized), by_book(probs), C.transpose(1, 2));
    }
  });
  return {probs, quantized, entropy};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> soft_quantize_backward_cpu(
    const c10::optional<at::Tensor>& grad_probs, const c10::optional<at::Tensor>& grad_quantized,
    const c10::optional<at::Tensor>& grad_entropy, const at::Tensor& x_in,
    const at::Tensor& assign_weight, const at::Tensor& codebook, const at::Tensor& probs_in,
    double scale, bool normalize, std::array<bool, 3> output_mask) {
  const auto in = prepare_backward_inputs(grad_probs, grad_quantized, grad_entropy, x_in,
                                          assign_weight, codebook, probs_in, scale);
  check_cpu_dtype(x_in);
  if (is_half_float(x_in)) {
    return to_dtype(soft_quantize_backward_cpu(to_float(grad_probs), to_float(grad_quantized),
                                               to_float(grad_entropy), to_float(x_in), to_float(assign_weight),
                                               to_float(codebook), to_float(probs_in), scale, normalize,
                                               output_mask),
                    x_in.scalar_type());
  }
  const auto [B, M, d, K] = in.dims;
  const bool need_x = output_mask[0], need_a = output_mask[1];
  const at::Tensor& x = in.x;
  const at::Tensor& gp = in.grad_probs;
  const at::Tensor& gq = in.grad_quantized;

  const bool any_grad = (need_x || need_a) && B > 0;
  if (any_grad && use_peaked_products(in.probs, d)) {
    const auto peaked = peaked_backward(in, scale, normalize, need_x, need_a);
    return finish_backward(in, peaked.grad_x, peaked.g, x_in.sizes(), output_mask, peaked.grad_assign_weight);
  }
  // g: [B, M, K] = scale * dL/dlogits / max(||x||, eps), shared by grad_x and grad_assign_weight
  at::Tensor g = at::empty({B, M, K}, x.options());
  at::Tensor grad_x = at::empty({need_x ? B : 0, M, d}, x.options());
  if (!any_grad) {
    g.zero_();
    grad_x.zero_();
    return finish_backward(in, grad_x, g, x_in.sizes(), output_mask);
  }
  if (gp.defined()) g.copy_(gp);
  else if (!gq.defined()) g.zero_();
  if (gq.defined()) {  // dL/dprobs[b, m] += grad_quantized[b, m] @ C[m]
    if (gp.defined()) by_book(g).baddbmm_(by_book(gq), in.codebook);
    else bmm_into(by_book(g), by_book(gq), in.codebook);
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "soft_quantize_backward_cpu", [&] {
    const auto& kernels = row_kernels<scalar_t>();
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    at::Tensor norms = normalize ? at::empty({B, M}, x.options()) : at::Tensor();
    scalar_t* norms_ptr = normalize ? norms.mutable_data_ptr<scalar_t>() : nullptr;
    const scalar_t* p_ptr = in.probs.const_data_ptr<scalar_t>();
    const scalar_t* gh_ptr = in.grad_entropy.defined() ? in.grad_entropy.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* g_ptr = g.mutable_data_ptr<scalar_t>();
    for_rows(B * M, K, [&](int64_t r0, int64_t rows) {
      if (normalize) kernels.row_norms(x_ptr + r0 * d, rows, d, norms_ptr + r0);
      kernels.softmax_backward_rows(p_ptr + r0 * K, gh_ptr != nullptr ? gh_ptr + r0 : nullptr,
                                    g_ptr + r0 * K, rows, K, static_cast<scalar_t>(scale),
                                    norms_ptr != nullptr ? norms_ptr + r0 : nullptr);
    });
    if (!need_x) return;
    bmm_into(by_book(grad_x), by_book(g), in.assign_weight.transpose(1, 2));
    if (!normalize) return;
    scalar_t* gx_ptr = grad_x.mutable_data_ptr<scalar_t>();
    for_rows(B * M, d, [&](int64_t r0, int64_t rows) {
      kernels.normalize_backward_rows(x_ptr + r0 * d, norms_ptr + r0, gx_ptr + r0 * d, rows, d);
    });
  });
  return finish_backward(in, grad_x, g, x_in.sizes(), output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(opqn_ext, CPU, m) {
  m.impl("soft_quantize", &soft_quantize_cpu);
  m.impl("soft_quantize_backward", &soft_quantize_backward_cpu);
}

}  // namespace opqn::cpu
