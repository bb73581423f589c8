// The host side of the CUDA adc top-k: queries in groups that a grid holds, the database in
// chunks, each chunk's top-k from the blocks' candidates (select path, k <= 1024) or from every
// code's rank key (dense path), merged into the running top-k. Generic over the kernel launcher,
// so the tests' CUDA emulator runs this very code on CPU tensors (python_tests/cuda_emulation);
// adc_scan_cuda.cu instantiates it with CUDA launches.
// A Launcher has, for luts [nq, M, Codes::kLutStride] and codes [first, first + count):
//   select(luts, codes, first, count, k, candidates [nq, blocks, k])   adc_select_kernel
//   dense(luts, codes, first, count, scores [nq, count] or null, keys [nq, count] or null)
//   decode(top [n], n, first, scores [n], indices [n])                  decode_keys_kernel
#pragma once

#include <algorithm>
#include <tuple>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/topk.h>

#include "adc.h"
#include "cuda/adc_scan_kernels.cuh"

namespace opqn::cuda {

constexpr int64_t kChunkElements = int64_t(1) << 24;  // keys or candidates of one chunk: 128 MiB

// Codes per chunk of N for nq queries: the chunk's candidates (select path) or keys (dense path)
// stay within chunk_elements, or the size of the results where those are larger; the first chunk
// holds at least k codes; positions within a chunk fit the rank keys.
inline int64_t chunk_codes(int64_t N, int64_t nq, int64_t k, int64_t chunk_elements) {
  const int64_t per_chunk = k <= kMaxSelectK ? kBlockCodes * std::max<int64_t>(1, chunk_elements / (nq * k))
                                             : std::max(k, chunk_elements / nq);
  return std::min({N, per_chunk, static_cast<int64_t>(kMaxPosition) + 1});
}

// The signed rank keys of the min(k, count) best codes of [first, first + count) per query,
// best first: [nq, min(k, count)].
template <class Launcher, class Codes>
at::Tensor chunk_top_keys(const Launcher& launcher, const at::Tensor& luts, const Codes& codes, int64_t first,
                          int64_t count, int64_t k) {
  const int64_t nq = luts.size(0);
  const auto long_options = luts.options().dtype(at::kLong);
  at::Tensor keys;
  if (k <= kMaxSelectK) {
    keys = at::empty({nq, ceil_div(count, kBlockCodes) * k}, long_options);  // [nq, blocks, k] candidates
    launcher.select(luts, codes, first, count, k, keys.mutable_data_ptr<int64_t>());
  } else {
    keys = at::empty({nq, count}, long_options);
    launcher.dense(luts, codes, first, count, nullptr, keys.mutable_data_ptr<int64_t>());
  }
  return std::get<0>(keys.topk(std::min(k, count), 1, true, true));
}

// The top-k of N codes for every query of lut [nq <= kMaxGridQueries, M, K <= Codes::kLutStride]
// (validated): scores [nq, k] descending, indices [nq, k], ties by smaller index.
template <class Launcher, class Codes>
std::tuple<at::Tensor, at::Tensor> scan_topk_queries(const Launcher& launcher, const at::Tensor& lut,
                                                     const Codes& codes, int64_t N, int64_t k,
                                                     int64_t chunk_elements) {
  const int64_t nq = lut.size(0);
  const at::Tensor luts = pad_lut(lut.contiguous(), Codes::kLutStride);  // [nq, M, stride]
  const int64_t chunk = chunk_codes(N, nq, k, chunk_elements);
  at::Tensor best_scores, best_indices;
  for (int64_t first = 0; first < N; first += chunk) {
    const int64_t count = std::min(chunk, N - first);
    const at::Tensor top = chunk_top_keys(launcher, luts, codes, first, count, k);
    at::Tensor chunk_scores = at::empty(top.sizes(), lut.options());
    at::Tensor chunk_indices = at::empty(top.sizes(), top.options());
    launcher.decode(top.const_data_ptr<int64_t>(), top.numel(), first, chunk_scores.mutable_data_ptr<float>(),
                    chunk_indices.mutable_data_ptr<int64_t>());
    if (!best_scores.defined()) {
      best_scores = chunk_scores;
      best_indices = chunk_indices;
      continue;
    }
    // Running results precede this chunk's in the concatenation and have smaller indices, and
    // each side is already in result order: a stable sort by score keeps ties by index.
    const at::Tensor all_scores = at::cat({best_scores, chunk_scores}, 1);
    const at::Tensor all_indices = at::cat({best_indices, chunk_indices}, 1);
    const auto [sorted, order] = all_scores.sort(true, 1, true);
    best_scores = sorted.narrow(1, 0, k).contiguous();
    best_indices = all_indices.gather(1, order.narrow(1, 0, k));
  }
  return {best_scores, best_indices};
}

// scan_topk_queries for any number of queries, in groups of at most max_queries (the grids hold
// one query per block row).
template <class Launcher, class Codes>
std::tuple<at::Tensor, at::Tensor> scan_topk(const Launcher& launcher, const at::Tensor& lut, const Codes& codes,
                                             int64_t N, int64_t k, int64_t chunk_elements = kChunkElements,
                                             int64_t max_queries = kMaxGridQueries) {
  const int64_t nq = lut.size(0);
  if (nq == 0) {
    return {at::empty({0, k}, lut.options()), at::empty({0, k}, lut.options().dtype(at::kLong))};
  }
  if (nq <= max_queries) return scan_topk_queries(launcher, lut, codes, N, k, chunk_elements);
  std::vector<at::Tensor> scores, indices;
  for (int64_t q0 = 0; q0 < nq; q0 += max_queries) {
    auto [s, i] = scan_topk_queries(launcher, lut.narrow(0, q0, std::min(max_queries, nq - q0)), codes, N, k,
                                    chunk_elements);
    scores.push_back(std::move(s));
    indices.push_back(std::move(i));
  }
  return {at::cat(scores), at::cat(indices)};
}

}  // namespace opqn::cuda
