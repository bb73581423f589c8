// CPU adc_topk: the scanner of the active ISA, run on every thread (topk_tasks.h); the per-part
// top-k lists of a query are merged. The result order (score descending, then smaller index) is a
// total order, so the merged result is the same for every thread count and ISA.
#include <algorithm>
#include <vector>

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
  if (active_cpu_isa() == CpuIsa::Avx2) return &avx2::adc_scan;
#endif
  return &scalar::adc_scan;
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
  float* score_out = scores.mutable_data_ptr<float>();
  int64_t* index_out = indices.mutable_data_ptr<int64_t>();
  for_query_batches(nq, k, [&](int64_t b0, int64_t b1) {
    const int64_t nb = b1 - b0;
    const PartialTopK partial = scan_in_parallel(
        nb, N, kMinCodesPerPart, k, [&](int64_t q0, int64_t q1, int64_t r0, int64_t r1, TopK* tops) {
          scan(lut_ptr + (b0 + q0) * M * kLutStride, q1 - q0, code_ptr, N, M, r0, r1, tops);
        });
    at::parallel_for(0, nb, 16, [&](int64_t begin, int64_t end) {
      std::vector<ScoredId> merged;
      for (int64_t q = begin; q < end; ++q) {
        merged.clear();
        for (int64_t part = 0; part < partial.parts; ++part) {
          const TopK& top = partial.tops[part * nb + q];
          merged.insert(merged.end(), top.entries, top.entries + top.size);
        }
        std::partial_sort(merged.begin(), merged.begin() + k, merged.end(), ranks_before);
        for (int64_t j = 0; j < k; ++j) {
          score_out[(b0 + q) * k + j] = merged[j].score;
          index_out[(b0 + q) * k + j] = merged[j].id;
        }
      }
    });
  });
  return {scores, indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(opqn_ext, CPU, m) { m.impl("adc_topk", &adc_topk_cpu); }

}  // namespace opqn::cpu
