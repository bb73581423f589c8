#include "cpu/peaked_products.h"

#include <algorithm>
#include <functional>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include "cpu/row_kernels.h"

namespace opqn::cpu {
namespace {

// weights [M, d, K] -> [M, K, d] (contiguous): word k of book m is the contiguous row [m, k].
// Parallel over books and strips of rows.
at::Tensor words_as_rows(const at::Tensor& weights) {
  const int64_t M = weights.size(0), R = weights.size(1), C = weights.size(2);
  at::Tensor out = at::empty({M, C, R}, weights.options());
  const int64_t tile_rows = (R + kTransposeTile - 1) / kTransposeTile;
  AT_DISPATCH_FLOATING_TYPES(weights.scalar_type(), "words_as_rows", [&] {
    const auto& kernels = row_kernels<scalar_t>();
    const scalar_t* src = weights.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, M * tile_rows, std::max<int64_t>(1, 8192 / (kTransposeTile * C)), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t m = t / tile_rows, r0 = (t % tile_rows) * kTransposeTile;
        kernels.transpose_rows(src + m * R * C, dst + m * R * C, R, C, r0, std::min(R, r0 + kTransposeTile));
      }
    });
  });
  return out;
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// Columns of the weight gradient that one task accumulates (one book at a time).
constexpr int64_t kWeightGradSlice = 64;

}  // namespace

bool use_peaked_products(const at::Tensor& probs, int64_t d) {
  const int64_t n = probs.numel();
  const int64_t K = probs.size(-1);
  int64_t kept = 0;
  bool small = false;
  AT_DISPATCH_FLOATING_TYPES(probs.scalar_type(), "use_peaked_products", [&] {
    small = n * d <= kRowProductsMaxMacs<scalar_t>;
    if (small) return;
    const auto& kernels = row_kernels<scalar_t>();
    const scalar_t floor = kept_floor<scalar_t>(K);
    const scalar_t* p = probs.const_data_ptr<scalar_t>();
    kept = at::parallel_reduce(0, n, int64_t(1) << 16, int64_t(0), [&](int64_t begin, int64_t end, int64_t count) {
      return count + kernels.count_kept(p + begin, end - begin, floor);
    }, std::plus<int64_t>());
  });
  return !small && static_cast<double>(kept) <= peaked_max_density(d, K) * static_cast<double>(n);
}

void peaked_reconstruct(const at::Tensor& probs, const at::Tensor& codebook, at::Tensor& quantized) {
  const int64_t B = probs.size(0), M = probs.size(1), K = probs.size(2), d = codebook.size(1);
  const at::Tensor Ct = words_as_rows(codebook);
  AT_DISPATCH_FLOATING_TYPES(probs.scalar_type(), "peaked_reconstruct", [&] {
    const auto& kernels = row_kernels<scalar_t>();
    const scalar_t floor = kept_floor<scalar_t>(K);
    const scalar_t* p = probs.const_data_ptr<scalar_t>();
    const scalar_t* ct = Ct.const_data_ptr<scalar_t>();
    scalar_t* q = quantized.mutable_data_ptr<scalar_t>();
    for_sample_rows(B, M, d * K, [&](int64_t r0, int64_t rows) {
      kernels.peaked_reconstructions(p + r0 * K, ct, rows, M, d, K, floor, q + r0 * d);
    });
  });
}

PeakedGradients peaked_backward(const SoftQuantizeBackwardInputs& in, double scale, bool normalize,
                                bool need_x, bool need_a) {
  const auto [B, M, d, K] = in.dims;
  const at::Tensor& x = in.x;
  at::Tensor g = at::empty({B, M, K}, x.options());
  at::Tensor grad_x = at::empty({need_x ? B : 0, M, d}, x.options());
  at::Tensor grad_a;
  const at::Tensor Ct = in.grad_quantized.defined() ? words_as_rows(in.codebook) : at::Tensor();
  const at::Tensor At = need_x ? words_as_rows(in.assign_weight) : at::Tensor();
  const at::Tensor norms = normalize ? at::empty({B, M}, x.options()) : at::Tensor();
  const auto int_options = x.options().dtype(at::kInt);
  at::Tensor kept_words = at::empty({B, M, K}, int_options);
  at::Tensor kept_counts = at::empty({B, M}, int_options);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "peaked_backward", [&] {
    const auto& kernels = row_kernels<scalar_t>();
    const scalar_t floor = kept_floor<scalar_t>(K);
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    const scalar_t* p = in.probs.const_data_ptr<scalar_t>();
    const scalar_t* gp = ptr_or_null<scalar_t>(in.grad_probs);
    const scalar_t* gq = ptr_or_null<scalar_t>(in.grad_quantized);
    const scalar_t* gh = ptr_or_null<scalar_t>(in.grad_entropy);
    const scalar_t* ct = ptr_or_null<scalar_t>(Ct);
    const scalar_t* at_ptr = ptr_or_null<scalar_t>(At);
    scalar_t* n_ptr = normalize ? norms.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* g_ptr = g.mutable_data_ptr<scalar_t>();
    scalar_t* gx = need_x ? grad_x.mutable_data_ptr<scalar_t>() : nullptr;
    int32_t* words = kept_words.mutable_data_ptr<int32_t>();
    int32_t* counts = kept_counts.mutable_data_ptr<int32_t>();
    for_sample_rows(B, M, d * K, [&](int64_t r0, int64_t rows) {
      if (normalize) kernels.row_norms(x_ptr + r0 * d, rows, d, n_ptr + r0);
      kernels.peaked_backward_rows(p + r0 * K, gp != nullptr ? gp + r0 * K : nullptr,
                                   gq != nullptr ? gq + r0 * d : nullptr, gh != nullptr ? gh + r0 : nullptr,
                                   ct, at_ptr, rows, M, d, K, static_cast<scalar_t>(scale),
                                   n_ptr != nullptr ? n_ptr + r0 : nullptr, floor, g_ptr + r0 * K,
                                   gx != nullptr ? gx + r0 * d : nullptr, words + r0 * K, counts + r0);
      if (gx != nullptr && normalize) kernels.normalize_backward_rows(x_ptr + r0 * d, n_ptr + r0, gx + r0 * d, rows, d);
    });
    if (!need_a) return;
    // One task per (book, slice of columns): the slice's rows of the transposed gradient summed
    // over the samples in order (so that the result does not depend on the number of threads) in
    // the task's own [K, slice] buffer, then written transposed into grad_a [M, d, K]
    grad_a = at::empty({M, d, K}, x.options());
    scalar_t* ga = grad_a.mutable_data_ptr<scalar_t>();
    const int64_t slices = (d + kWeightGradSlice - 1) / kWeightGradSlice;
    at::parallel_for(0, M * slices, 1, [&](int64_t u0, int64_t u1) {
      std::vector<scalar_t> grad_t(K * kWeightGradSlice);
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t book = u / slices, j0 = (u % slices) * kWeightGradSlice;
        const int64_t width = std::min(d, j0 + kWeightGradSlice) - j0;
        std::fill(grad_t.begin(), grad_t.begin() + K * width, scalar_t(0));
        kernels.peaked_weight_grad(x_ptr, g_ptr, words, counts, B, M, d, K, book, j0, j0 + width, grad_t.data());
        kernels.transpose_rows(grad_t.data(), ga + (book * d + j0) * K, K, width, 0, K);
      }
    });
  });
  return {grad_x, g, grad_a};
}

}  // namespace opqn::cpu
