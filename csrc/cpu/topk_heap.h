// The k best (score, id) pairs of a scan. Result order: higher score first, then smaller id.
// A plain struct with out-of-line functions (topk_heap.cpp, baseline ISA): the AVX2 scanner reads
// `threshold` directly and calls topk_offer, so no inline code is shared between ISA builds.
#pragma once

#include <cstdint>

namespace opqn::cpu {

struct ScoredId {
  float score;
  int64_t id;
};

// Whether a ranks before b in the result order.
bool ranks_before(const ScoredId& a, const ScoredId& b);

struct TopK {
  ScoredId* entries;  // [k] a heap whose top, entries[0], is the worst kept pair
  int64_t k;
  float threshold;  // entries[0].score; in a scan by increasing id, a score must exceed it to enter
};

// Starts an empty top-k over storage [k]: sentinel pairs (-inf, INT64_MAX) that any real pair beats.
void topk_init(TopK& top, ScoredId* storage, int64_t k);

// Keeps (score, id) if it ranks before the worst kept pair.
void topk_offer(TopK& top, float score, int64_t id);

// Sorts the kept pairs into result order, in place.
void topk_sort(TopK& top);

}  // namespace opqn::cpu
