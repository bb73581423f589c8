#include "adc.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include <ATen/ops/empty.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/zeros.h>

#include "checks.h"

namespace opqn {

namespace {

// Whether every entry of lut is finite: a plain pass on the CPU (an isfinite tensor, its reduction
// and their dispatch cost more than a small scan), a reduction and a sync on CUDA.
bool all_finite(const at::Tensor& lut) {
  if (!lut.is_cpu()) return at::isfinite(lut).all().item<bool>();
  const at::Tensor values = lut.contiguous();
  const float* v = values.const_data_ptr<float>();
  bool finite = true;
  for (int64_t i = 0; i < values.numel(); ++i) finite &= std::fabs(v[i]) <= std::numeric_limits<float>::max();
  return finite;
}

}  // namespace

void check_lut(const at::Tensor& lut, int64_t max_words, const char* codes) {
  check_defined(lut, "lut");
  check_rank(lut, 3, "lut", "[nq, M, K]");
  TORCH_CHECK(lut.scalar_type() == at::kFloat, "lut must be float32, got ", lut.scalar_type());
  TORCH_CHECK(lut.size(1) >= 1 && lut.size(1) <= kMaxBooks, "lut must have 1 <= M <= ", kMaxBooks,
              " books, got shape ", lut.sizes());
  TORCH_CHECK(lut.size(2) >= 1 && lut.size(2) <= max_words, "lut must have 1 <= K <= ", max_words,
              " words per book (", codes, "), got shape ", lut.sizes());
  TORCH_CHECK(all_finite(lut),
              "lut must be finite: it contains NaN or infinite values");
}

void check_code_tensor(const at::Tensor& t, const at::Tensor& lut, const char* name, int64_t rank,
                       const char* shape) {
  check_defined(t, name);
  check_rank(t, rank, name, shape);
  TORCH_CHECK(t.scalar_type() == at::kByte, name, " must be uint8, got ", t.scalar_type());
  check_same_device(t, lut, name, "lut");
}

void check_k(int64_t k, int64_t N) {
  TORCH_CHECK(k >= 1, "k must be >= 1, got ", k);
  TORCH_CHECK(k <= N, "k (", k, ") must be <= the number of codes N (", N, ")");
}

AdcDims check_lut_and_codes(const at::Tensor& lut, const at::Tensor& codes) {
  check_lut(lut, 256, "uint8 codes");
  check_code_tensor(codes, lut, "codes", 2, "[N, M]");
  const int64_t M = lut.size(1);
  TORCH_CHECK(codes.size(1) == M, "codes must have M=", M, " columns to match lut ", lut.sizes(),
              ", got shape ", codes.sizes());
  return {lut.size(0), M, lut.size(2), codes.size(0)};
}

AdcDims check_adc_args(const at::Tensor& lut, const at::Tensor& codes, int64_t k) {
  const AdcDims dims = check_lut_and_codes(lut, codes);
  check_k(k, dims.N);
  return dims;
}

void check_adc4_args(const at::Tensor& lut, const at::Tensor& packed, int64_t num_codes, int64_t k,
                     int64_t rerank) {
  check_lut(lut, 16, "4-bit codes");
  check_code_tensor(packed, lut, "packed", 3, "[blocks, pairs, 32] (from pack_codes4)");
  const int64_t M = lut.size(1);
  TORCH_CHECK(packed.size(1) == (M + 1) / 2 && packed.size(2) == 32, "packed must have shape [blocks, ",
              (M + 1) / 2, ", 32] for M=", M, " books, got ", packed.sizes());
  TORCH_CHECK(num_codes >= 0 && num_codes <= packed.size(0) * 32 && num_codes > (packed.size(0) - 1) * 32,
              "num_codes (", num_codes, ") does not match packed with ", packed.size(0), " blocks of 32 codes");
  check_k(k, num_codes);
  TORCH_CHECK(rerank >= 1, "rerank must be >= 1 (candidates re-scored per result), got ", rerank);
}

at::Tensor pad_lut(const at::Tensor& lut, int64_t width) {
  if (lut.size(2) == width) return lut.contiguous();  // nothing to pad
  if (!lut.is_cpu()) {
    at::Tensor padded = at::zeros({lut.size(0), lut.size(1), width}, lut.options());
    padded.narrow(2, 0, lut.size(2)).copy_(lut);
    return padded;
  }
  // on the CPU a plain copy: three dispatched ops cost more than a short scan
  const at::Tensor values = lut.contiguous();  // [rows, K] float32
  at::Tensor padded = at::empty({lut.size(0), lut.size(1), width}, lut.options());
  const int64_t rows = lut.size(0) * lut.size(1), K = lut.size(2);
  const float* in = values.const_data_ptr<float>();
  float* out = padded.mutable_data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    std::copy(in + r * K, in + (r + 1) * K, out + r * width);
    std::fill(out + r * width + K, out + (r + 1) * width, 0.0f);
  }
  return padded;
}

}  // namespace opqn
