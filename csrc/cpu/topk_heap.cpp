#include "cpu/topk_heap.h"

#include "cpu/radix_sort.h"

#include <algorithm>
#include <limits>
#include <vector>

namespace opqn::cpu {

namespace {

inline bool before(const ScoredId& a, const ScoredId& b) {
  return a.score > b.score || (a.score == b.score && a.id < b.id);
}

// Below this many pairs a comparison sort beats the radix passes.
constexpr int64_t kRadixMinPairs = 4096;

}  // namespace

void sort_in_result_order(ScoredId* pairs, int64_t n) {
  const bool ids_fit_32_bits = std::all_of(pairs, pairs + n, [](const ScoredId& p) {
    return p.id >= 0 && p.id <= int64_t(std::numeric_limits<uint32_t>::max());
  });
  if (n < kRadixMinPairs || !ids_fit_32_bits) {
    std::sort(pairs, pairs + n, before);
    return;
  }
  // Pairs already in id order (a scan that kept everything) only need a stable sort by score.
  const bool by_id = std::is_sorted(pairs, pairs + n, [](const ScoredId& a, const ScoredId& b) {
    return a.id < b.id;
  });
  // key: score order (high 32 bits), then id
  std::vector<uint64_t> keys(static_cast<size_t>(n)), scratch;
  for (int64_t i = 0; i < n; ++i)
    keys[i] = (uint64_t(descending_score_key(pairs[i].score)) << 32) | uint64_t(pairs[i].id);
  radix_sort(keys, scratch, by_id ? 32 : 0);
  for (int64_t i = 0; i < n; ++i)
    pairs[i] = {score_of_descending_key(uint32_t(keys[i] >> 32)), int64_t(keys[i] & 0xffffffffu)};
}

void keep_best_in_result_order(ScoredId* pairs, int64_t n, int64_t k) {
  k = std::min(k, n);
  if (std::is_sorted(pairs, pairs + n, before)) return;
  if (2 * k >= n) {
    sort_in_result_order(pairs, n);
    return;
  }
  std::nth_element(pairs, pairs + k, pairs + n, before);
  sort_in_result_order(pairs, k);
}

void topk_init(TopK& top, ScoredId* storage, int64_t k) {
  const ScoredId none{-std::numeric_limits<float>::infinity(), std::numeric_limits<int64_t>::max()};
  top = {storage, k, 0, none, none.score};
}

void topk_offer(TopK& top, float score, int64_t id) {
  const ScoredId item{score, id};
  if (!before(item, top.bound)) return;
  top.entries[top.size++] = item;
  if (top.size < 2 * top.k) return;
  std::nth_element(top.entries, top.entries + top.k - 1, top.entries + top.size, before);
  top.size = top.k;
  top.bound = top.entries[top.k - 1];
  top.threshold = top.bound.score;
}

void topk_finish(TopK& top) {
  keep_best_in_result_order(top.entries, top.size, top.k);
  top.size = std::min(top.size, top.k);
}

}  // namespace opqn::cpu
