// Runs a top-k scan of nq queries over a database of `units` (codes, or blocks of codes) on every
// thread: with at least as many queries as threads, each thread takes a share of the queries over
// the whole database; with fewer, the database is cut into parts (at least min_units_per_part each)
// so that even one query uses every core. Each (part, query) gets its own finished top-k list.
#pragma once

#include <algorithm>
#include <vector>

#include <ATen/Parallel.h>

#include "cpu/topk_heap.h"

namespace opqn::cpu {

struct PartialTopK {
  int64_t parts;
  std::vector<ScoredId> storage;
  std::vector<TopK> tops;  // [parts, nq], finished (topk_finish)
};

// Candidate lists of one batch of queries stay under this size, whatever nq and k are.
constexpr int64_t kMaxCandidateBytes = int64_t(256) << 20;

// Runs fn(q0, q1) over batches of queries small enough for kMaxCandidateBytes of candidate lists
// of `candidates` pairs (and never fewer queries than threads, so queries still split).
template <typename Fn>
void for_query_batches(int64_t nq, int64_t candidates, Fn&& fn) {
  const int64_t threads = at::get_num_threads();
  const int64_t per_query = threads * 2 * candidates * static_cast<int64_t>(sizeof(ScoredId));
  const int64_t batch = std::max(threads, kMaxCandidateBytes / per_query);
  for (int64_t q0 = 0; q0 < nq; q0 += batch) fn(q0, std::min(nq, q0 + batch));
}

// scan(q0, q1, first_unit, end_unit, tops) scans units [first_unit, end_unit) for queries [q0, q1)
// into tops[0, q1 - q0).
template <typename Scan>
PartialTopK scan_in_parallel(int64_t nq, int64_t units, int64_t min_units_per_part, int64_t k, Scan&& scan) {
  const int64_t threads = at::get_num_threads();
  PartialTopK result;
  result.parts = nq >= threads ? 1 : std::clamp<int64_t>(units / min_units_per_part, 1, threads);
  const int64_t parts = result.parts, query_groups = std::min(nq, threads);
  result.storage.resize(static_cast<size_t>(parts * nq * 2 * k));
  result.tops.resize(static_cast<size_t>(parts * nq));
  at::parallel_for(0, parts * query_groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t part = task / query_groups, group = task % query_groups;
      const int64_t q0 = nq * group / query_groups, q1 = nq * (group + 1) / query_groups;
      TopK* tops = result.tops.data() + part * nq;
      for (int64_t q = q0; q < q1; ++q) topk_init(tops[q], result.storage.data() + (part * nq + q) * 2 * k, k);
      scan(q0, q1, units * part / parts, units * (part + 1) / parts, tops + q0);
      for (int64_t q = q0; q < q1; ++q) topk_finish(tops[q]);
    }
  });
  return result;
}

}  // namespace opqn::cpu
