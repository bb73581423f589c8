// The k best (score, id) pairs of a scan. Result order: higher score first, then smaller id.
// A reservoir: pairs that beat the current bound are appended; when 2k have gathered, the best k
// are kept (a radix selection of the k-th score) and the k-th of them becomes the new bound.
// Amortized O(1) per kept pair.
// A plain struct with out-of-line functions (topk_heap.cpp, baseline ISA): the AVX2 scanners read
// `threshold` directly and call topk_offer, so no inline code is shared between ISA builds.
#pragma once

#include <cstdint>

namespace opqn::cpu {

struct ScoredId {
  float score;
  int64_t id;
};

struct TopK {
  ScoredId* entries;  // [2k] storage; entries[0, size) hold the candidates
  int64_t k;
  int64_t size;
  ScoredId bound;   // a pair must rank before it to be kept
  float threshold;  // bound.score; in a scan by increasing id, a score must exceed it to enter
};

// Sorts pairs [n] into result order (a radix sort for long runs whose ids fit in 32 bits).
void sort_in_result_order(ScoredId* pairs, int64_t n);

// Leaves the best min(k, n) of pairs [n] first, in result order (the rest in no order).
void keep_best_in_result_order(ScoredId* pairs, int64_t n, int64_t k);

// Starts an empty top-k over storage [2k].
void topk_init(TopK& top, ScoredId* storage, int64_t k);

// From now on only pairs scoring above `floor` are kept. Valid (the kept pairs stay the best k) only
// while no pair has been offered yet and at least k of the pairs to come score above it.
void topk_set_floor(TopK& top, float floor);

// Keeps (score, id) if it ranks before the bound.
void topk_offer(TopK& top, float score, int64_t id);

// Leaves the best min(size, k) pairs in entries[0, size), in the order they were offered.
void topk_finish(TopK& top);

}  // namespace opqn::cpu
