// CPU adc_topk: the scanner of the active ISA, run by search_topk (topk_tasks.h). The result order (score descending, then smaller index) is a
// total order, so the merged result is the same for every thread count and ISA.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "adc.h"
#include "cpu/adc_scan.h"
#include "cpu/cpu_isa.h"
#include "cpu/topk_tasks.h"

namespace opqn::cpu {

AdcScanFn adc_scanner() {
#if defined(__x86_64__) || defined(__i386__)
  if (active_cpu_isa() == CpuIsa::Avx512) return &avx512::adc_scan;
  if (active_cpu_isa() == CpuIsa::Avx2) return &avx2::adc_scan;
#endif
  return &scalar::adc_scan;
}

int64_t adc_query_granule(int64_t M) {
  if (M > kInterleavedMaxBooks) return 1;
  if (active_cpu_isa() == CpuIsa::Avx512) return kInterleavedLanesAvx512;
  if (active_cpu_isa() == CpuIsa::Avx2) return kInterleavedLanesAvx2;
  return 1;
}

namespace {

constexpr int64_t kMinCodesPerPart = 16384;  // smaller database parts are not worth a thread

std::tuple<at::Tensor, at::Tensor> adc_topk_cpu(const at::Tensor& lut, const at::Tensor& codes_in,
                                                int64_t k) {
  const auto [nq, M, K, N] = check_adc_args(lut, codes_in, k);
  at::Tensor scores = at::empty({nq, k}, lut.options());
  at::Tensor indices = at::empty({nq, k}, lut.options().dtype(at::kLong));
  if (nq == 0) return {scores, indices};
  const at::Tensor luts = pad_lut(lut.contiguous());  // [nq, M, 256]
  const at::Tensor codes = codes_in.contiguous();
  const AdcScanFn scan = adc_scanner();

  const float* lut_ptr = luts.const_data_ptr<float>();
  const uint8_t* code_ptr = codes.const_data_ptr<uint8_t>();
  search_topk(
      nq, adc_query_granule(M), N, kMinCodesPerPart, k, k,
      [&](int64_t q0, int64_t q1, int64_t r0, int64_t r1, TopK* tops) {
        scan(lut_ptr + q0 * M * kLutStride, q1 - q0, code_ptr, N, M, r0, r1, tops);
      },
      [](int64_t, ScoredId*, int64_t) {}, scores.mutable_data_ptr<float>(),
      indices.mutable_data_ptr<int64_t>());
  return {scores, indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(opqn_ext, CPU, m) { m.impl("adc_topk", &adc_topk_cpu); }

}  // namespace opqn::cpu
