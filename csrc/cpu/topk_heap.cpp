#include "cpu/topk_heap.h"

#include <algorithm>
#include <limits>

namespace opqn::cpu {

namespace {
inline bool before(const ScoredId& a, const ScoredId& b) {
  return a.score > b.score || (a.score == b.score && a.id < b.id);
}
}  // namespace

bool ranks_before(const ScoredId& a, const ScoredId& b) { return before(a, b); }

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
  std::sort(top.entries, top.entries + top.size, before);
  top.size = std::min(top.size, top.k);
}

}  // namespace opqn::cpu
