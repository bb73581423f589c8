// CPU rank_stats: each query's whole ranking of the database (score descending, ties to the smaller
// index) by a stable radix sort of its scores, then one walk down the ranking that accumulates the
// average precision and the hits and precision sums at every cutoff. Parallel over queries. The
// scores are checked finite while their sort keys are made (no pass of its own over [nq, N]).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/radix_sort.h"

namespace opqn::cpu {
namespace {

void check_rank_stats_args(const at::Tensor& scores, const at::Tensor& query_labels,
                           const at::Tensor& db_labels, at::IntArrayRef cutoffs) {
  check_defined(scores, "scores");
  check_rank(scores, 2, "scores", "[nq, N]");
  TORCH_CHECK(scores.scalar_type() == at::kFloat, "scores must be float32, got ", scores.scalar_type());
  TORCH_CHECK(scores.device().is_cpu(), "scores must be on the CPU (rank_stats is a CPU op), got ",
              scores.device());
  const int64_t nq = scores.size(0), N = scores.size(1);
  TORCH_CHECK(N <= int64_t(std::numeric_limits<uint32_t>::max()),
              "scores must have fewer than 2^32 database items, got N=", N);
  for (const auto& [t, name, len] : {std::tuple{&query_labels, "query_labels", nq},
                                     std::tuple{&db_labels, "db_labels", N}}) {
    check_defined(*t, name);
    TORCH_CHECK(t->scalar_type() == at::kLong, name, " must be int64, got ", t->scalar_type());
    check_same_device(*t, scores, name, "scores");
    check_shape(*t, {len}, name);
  }
  for (int64_t c : cutoffs)
    TORCH_CHECK(c >= 1 && c <= N, "cutoffs must be in [1, N=", N, "], got ", c);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rank_stats_cpu(
    const at::Tensor& scores_in, const at::Tensor& query_labels_in, const at::Tensor& db_labels_in,
    at::IntArrayRef cutoffs) {
  check_rank_stats_args(scores_in, query_labels_in, db_labels_in, cutoffs);
  const int64_t nq = scores_in.size(0), N = scores_in.size(1);
  const int64_t P = static_cast<int64_t>(cutoffs.size());
  const auto f64 = scores_in.options().dtype(at::kDouble), i64 = scores_in.options().dtype(at::kLong);
  at::Tensor average_precision = at::empty({nq}, f64);
  at::Tensor hits = at::empty({nq, P}, i64);
  at::Tensor precision_sums = at::empty({nq, P}, f64);
  at::Tensor num_relevant = at::empty({nq}, i64);
  const at::Tensor scores = scores_in.contiguous();
  const at::Tensor query_labels = query_labels_in.contiguous();
  const at::Tensor db_labels = db_labels_in.contiguous();

  // The cutoffs in increasing order, each with the output column it fills.
  std::vector<int64_t> order(static_cast<size_t>(P));
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return cutoffs[a] < cutoffs[b]; });

  const float* score_ptr = scores.const_data_ptr<float>();
  const int64_t* qlabel = query_labels.const_data_ptr<int64_t>();
  const int64_t* dblabel = db_labels.const_data_ptr<int64_t>();
  double* ap = average_precision.mutable_data_ptr<double>();
  int64_t* hit_ptr = hits.mutable_data_ptr<int64_t>();
  double* psum_ptr = precision_sums.mutable_data_ptr<double>();
  int64_t* rel_ptr = num_relevant.mutable_data_ptr<int64_t>();

  std::atomic<bool> all_finite{true};
  at::parallel_for(0, nq, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint64_t> keys(static_cast<size_t>(N)), scratch;  // [N]: score key << 32 | index
    for (int64_t q = begin; q < end; ++q) {
      const float* row = score_ptr + q * N;
      bool finite = true;
      for (int64_t i = 0; i < N; ++i) {
        finite &= std::isfinite(row[i]);
        keys[i] = (uint64_t(descending_score_key(row[i])) << 32) | uint64_t(i);
      }
      if (!finite) {
        all_finite.store(false, std::memory_order_relaxed);
        continue;
      }
      radix_sort(keys, scratch, 32);  // stable on the score: equal scores stay in index order
      const int64_t label = qlabel[q];
      int64_t found = 0, next = 0;
      double psum = 0.0;
      for (int64_t r = 0; r < N; ++r) {
        if (dblabel[keys[r] & 0xffffffffu] == label) {
          ++found;
          psum += double(found) / double(r + 1);
        }
        for (; next < P && cutoffs[order[next]] == r + 1; ++next) {
          hit_ptr[q * P + order[next]] = found;
          psum_ptr[q * P + order[next]] = psum;
        }
      }
      rel_ptr[q] = found;
      ap[q] = found > 0 ? psum / double(found) : 0.0;
    }
  });
  TORCH_CHECK(all_finite.load(), "scores must be finite: they contain NaN or infinite values");
  return {average_precision, hits, precision_sums, num_relevant};
}

}  // namespace

TORCH_LIBRARY_IMPL(opqn_ext, CPU, m) { m.impl("rank_stats", &rank_stats_cpu); }

}  // namespace opqn::cpu
