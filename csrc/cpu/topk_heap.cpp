#include "cpu/topk_heap.h"

#include <algorithm>
#include <limits>

namespace opqn::cpu {

bool ranks_before(const ScoredId& a, const ScoredId& b) {
  return a.score > b.score || (a.score == b.score && a.id < b.id);
}

void topk_init(TopK& top, ScoredId* storage, int64_t k) {
  std::fill(storage, storage + k, ScoredId{-std::numeric_limits<float>::infinity(),
                                           std::numeric_limits<int64_t>::max()});
  top = {storage, k, -std::numeric_limits<float>::infinity()};
}

void topk_offer(TopK& top, float score, int64_t id) {
  const ScoredId item{score, id};
  ScoredId* h = top.entries;
  if (!ranks_before(item, h[0])) return;
  // Replace the worst pair, then sift the newcomer down: every parent ranks after its children.
  int64_t i = 0;
  for (;;) {
    int64_t child = 2 * i + 1;
    if (child >= top.k) break;
    if (child + 1 < top.k && ranks_before(h[child], h[child + 1])) ++child;  // the worse child
    if (!ranks_before(item, h[child])) break;
    h[i] = h[child];
    i = child;
  }
  h[i] = item;
  top.threshold = h[0].score;
}

void topk_sort(TopK& top) { std::sort(top.entries, top.entries + top.k, ranks_before); }

}  // namespace opqn::cpu
