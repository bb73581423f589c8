#include "cpu/topk_heap.h"

#include "cpu/radix_sort.h"

#include <algorithm>
#include <array>
#include <limits>
#include <vector>

namespace opqn::cpu {

namespace {

// Result order, as a function object so that the sorts and selections inline it.
struct Before {
  bool operator()(const ScoredId& a, const ScoredId& b) const {
    return a.score > b.score || (a.score == b.score && a.id < b.id);
  }
};
constexpr Before before{};

// From this many pairs on, a radix sort of 64-bit keys (score order, then id) beats std::sort.
constexpr int64_t kRadixMinPairs = 4096;
// From this many pairs in id order on, a stable radix sort by score alone beats std::sort, whose
// comparisons of close scores mispredict about every other time.
constexpr int64_t kScoreRadixMinPairs = 32;

bool in_id_order(const ScoredId* pairs, int64_t n) {
  return std::is_sorted(pairs, pairs + n, [](const ScoredId& a, const ScoredId& b) { return a.id < b.id; });
}

}  // namespace

void sort_in_result_order(ScoredId* pairs, int64_t n) {
  std::vector<uint64_t> keys, scratch;
  if (n >= kScoreRadixMinPairs && in_id_order(pairs, n)) {
    // a stable sort by score keeps id order among equal scores; key: score order (high 32 bits),
    // then position, so that ids of any size are carried by position
    keys.resize(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) keys[i] = (uint64_t(descending_score_key(pairs[i].score)) << 32) | uint64_t(i);
    radix_sort(keys, scratch, 32);
    const std::vector<ScoredId> copy(pairs, pairs + n);
    for (int64_t i = 0; i < n; ++i) pairs[i] = copy[keys[i] & 0xffffffffu];
    return;
  }
  const bool ids_fit_32_bits = std::all_of(pairs, pairs + n, [](const ScoredId& p) {
    return p.id >= 0 && p.id <= int64_t(std::numeric_limits<uint32_t>::max());
  });
  if (n < kRadixMinPairs || !ids_fit_32_bits) {
    std::sort(pairs, pairs + n, before);
    return;
  }
  // key: score order (high 32 bits), then id
  keys.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i)
    keys[i] = (uint64_t(descending_score_key(pairs[i].score)) << 32) | uint64_t(pairs[i].id);
  radix_sort(keys, scratch, 0);
  for (int64_t i = 0; i < n; ++i)
    pairs[i] = {score_of_descending_key(uint32_t(keys[i] >> 32)), int64_t(keys[i] & 0xffffffffu)};
}

void keep_best_in_result_order(ScoredId* pairs, int64_t n, int64_t k) {
  k = std::min(k, n);
  if (std::is_sorted(pairs, pairs + n, before)) return;
  // pairs in id order (every scan's, merged part after part) are sorted whole in linear time
  if (2 * k >= n || (n < kRadixMinPairs && in_id_order(pairs, n))) {
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

void topk_set_floor(TopK& top, float floor) {
  top.bound = {floor, std::numeric_limits<int64_t>::min()};
  top.threshold = floor;
}

namespace {

// Up to this many entries (k <= 32) a comparison selection keeps the best k: the radix selection's
// four passes over 256 digit counts cost more than its branches save.
constexpr int64_t kSmallReservoir = 64;

// compact() for reservoirs of at most kSmallReservoir entries: the k-th best pair in result order
// is selected from a copy; the pairs that rank at or before it stay, in the order they were offered.
void compact_small(TopK& top) {
  const int64_t n = top.size;
  ScoredId ranked[kSmallReservoir];
  std::copy(top.entries, top.entries + n, ranked);
  std::nth_element(ranked, ranked + (top.k - 1), ranked + n, before);
  const ScoredId kth = ranked[top.k - 1];
  int64_t kept = 0;
  for (int64_t i = 0; i < n; ++i) {
    const ScoredId e = top.entries[i];
    top.entries[kept] = e;
    kept += !before(kth, e);
  }
  top.size = kept;
  top.bound = kth;
  top.threshold = kth.score;
}

// Keeps the best k of the 2k entries. The k-th best score is found by a radix selection on
// descending_score_key, one 8-bit digit per pass, counting only the keys that share the digits
// found so far (no branch on the data, unlike a comparison selection of scores this close
// together); of the entries with that score, the smallest ids stay. The same pairs stay, and the
// same bound results, as from a selection in result order.
void compact(TopK& top) {
  if (top.size <= kSmallReservoir) return compact_small(top);
  constexpr int64_t kStackEntries = 512;  // scratch on the stack up to here (k <= 256), else on the heap
  const int64_t n = top.size;
  uint32_t stack_keys[kStackEntries];
  int64_t stack_ids[kStackEntries];
  std::vector<uint32_t> heap_keys(n > kStackEntries ? n : 0);
  std::vector<int64_t> heap_ids(n > kStackEntries ? n : 0);
  uint32_t* keys = n > kStackEntries ? heap_keys.data() : stack_keys;
  int64_t* tie_ids = n > kStackEntries ? heap_ids.data() : stack_ids;
  uint32_t varying = 0;  // the bits in which some key differs from the first
  for (int64_t i = 0; i < n; ++i) {
    keys[i] = descending_score_key(top.entries[i].score);
    varying |= keys[i] ^ keys[0];
  }
  uint32_t kth = 0, known = 0;  // the digits of the k-th smallest key found so far, and their mask
  int64_t rank = top.k;          // its rank among the keys that share those digits
  for (int shift = 24; shift >= 0; shift -= 8) {
    known |= 0xFFu << shift;
    if (((varying >> shift) & 0xFFu) == 0) {  // a digit every key shares (close scores share several)
      kth |= keys[0] & (0xFFu << shift);
      continue;
    }
    std::array<int64_t, 256> count{};
    const uint32_t prefix = known & ~(0xFFu << shift);  // the digits found before this one
    for (int64_t i = 0; i < n; ++i) count[(keys[i] >> shift) & 0xFFu] += (keys[i] & prefix) == kth;
    uint32_t digit = 0;
    for (; count[digit] < rank; ++digit) rank -= count[digit];
    kth |= digit << shift;
  }
  int64_t ties = 0;  // the ids of the entries whose key is kth; the `rank` smallest of them stay
  for (int64_t i = 0; i < n; ++i) {
    tie_ids[ties] = top.entries[i].id;
    ties += keys[i] == kth;
  }
  if (ties > rank) std::nth_element(tie_ids, tie_ids + (rank - 1), tie_ids + ties);
  const int64_t last_tie = *std::max_element(tie_ids, tie_ids + rank);
  int64_t kept = 0;
  for (int64_t i = 0; i < n; ++i) {
    const ScoredId e = top.entries[i];
    top.entries[kept] = e;
    kept += (keys[i] < kth) | ((keys[i] == kth) & (e.id <= last_tie));
  }
  top.size = kept;
  top.bound = {score_of_descending_key(kth), last_tie};
  top.threshold = top.bound.score;
}

}  // namespace

void topk_offer(TopK& top, float score, int64_t id) {
  const ScoredId item{score, id};
  if (!before(item, top.bound)) return;
  top.entries[top.size++] = item;
  if (top.size == 2 * top.k) compact(top);
}

void topk_finish(TopK& top) {
  if (top.size > top.k) compact(top);
}

}  // namespace opqn::cpu
