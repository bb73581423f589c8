// The whole CPU top-k search shared by adc_topk and adc_topk4. Queries go in batches small enough
// that their candidate lists stay under kMaxCandidateBytes; a batch is scanned on every thread:
// where the groups of query_granule queries split evenly between the threads, each thread takes
// its share of them over the whole database; otherwise (fewer groups than threads included) the
// database is cut into parts too (at least min_units_per_part units each), a part per thread with
// every group, so that the threads get equal work and even one query uses every core.
// query_granule is the number of queries a scanner handles at the cost of one (its groups' width),
// so that no thread pays for a group it only partly fills while another thread could share it.
// Each query's candidates from all parts are then put in result order and its best k written out.
// The result order is total, so the output is the same for every thread count.
#pragma once

#include <algorithm>
#include <vector>

#include <ATen/Parallel.h>

#include "cpu/topk_heap.h"

namespace opqn::cpu {

constexpr int64_t kMaxCandidateBytes = int64_t(256) << 20;

// scan(q0, q1, first_unit, end_unit, tops): scans database units [first_unit, end_unit) (codes or
// blocks of codes) for queries [q0, q1) into tops[0, q1 - q0), keeping `candidates` each.
// rescore(q, pairs, n): replaces the scores of query q's n candidates by their final scores (does
// nothing when the scan scores exactly). scores, ids: [nq, k] outputs.
template <typename Scan, typename Rescore>
void search_topk(int64_t nq, int64_t query_granule, int64_t units, int64_t min_units_per_part,
                 int64_t candidates, int64_t k, Scan&& scan, Rescore&& rescore, float* scores, int64_t* ids) {
  const int64_t threads = at::get_num_threads();
  const int64_t per_query = threads * 2 * candidates * static_cast<int64_t>(sizeof(ScoredId));
  const int64_t batch = std::max(threads, kMaxCandidateBytes / per_query);
  std::vector<ScoredId> storage;
  std::vector<TopK> tops;  // [parts, queries of the batch]
  for (int64_t b0 = 0; b0 < nq; b0 += batch) {
    const int64_t nb = std::min(batch, nq - b0);
    const int64_t granules = (nb + query_granule - 1) / query_granule;
    const bool even_split = granules % threads == 0;  // every thread gets as many groups
    const int64_t parts = even_split ? 1 : std::clamp<int64_t>(units / min_units_per_part, 1, threads);
    const int64_t groups = std::min(granules, threads);
    storage.resize(static_cast<size_t>(parts * nb * 2 * candidates));
    tops.resize(static_cast<size_t>(parts * nb));
    at::parallel_for(0, parts * groups, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t part = task / groups, group = task % groups;
        const int64_t q0 = std::min(nb, granules * group / groups * query_granule);
        const int64_t q1 = std::min(nb, granules * (group + 1) / groups * query_granule);
        TopK* part_tops = tops.data() + part * nb;
        for (int64_t q = q0; q < q1; ++q)
          topk_init(part_tops[q], storage.data() + (part * nb + q) * 2 * candidates, candidates);
        scan(b0 + q0, b0 + q1, units * part / parts, units * (part + 1) / parts, part_tops + q0);
        for (int64_t q = q0; q < q1; ++q) topk_finish(part_tops[q]);
      }
    });
    at::parallel_for(0, nb, 16, [&](int64_t begin, int64_t end) {
      std::vector<ScoredId> merged;
      for (int64_t q = begin; q < end; ++q) {
        merged.clear();
        for (int64_t part = 0; part < parts; ++part) {
          const TopK& top = tops[part * nb + q];
          merged.insert(merged.end(), top.entries, top.entries + top.size);
        }
        rescore(b0 + q, merged.data(), static_cast<int64_t>(merged.size()));
        keep_best_in_result_order(merged.data(), static_cast<int64_t>(merged.size()), k);
        for (int64_t j = 0; j < k; ++j) {
          scores[(b0 + q) * k + j] = merged[j].score;
          ids[(b0 + q) * k + j] = merged[j].id;
        }
      }
    });
  }
}

}  // namespace opqn::cpu
