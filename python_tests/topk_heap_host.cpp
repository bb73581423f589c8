// Host check of the CPU top-k reservoir (csrc/cpu/topk_heap.{h,cpp}) on its own: pairs offered in
// increasing id order (as every scan offers them) and in random order, scores with heavy ties,
// signed zeros, infinities and one-ulp neighbours, k from 1 to past the selection's stack scratch.
// After topk_finish and a sort, the kept pairs must be the first k of a full sort in result order
// (higher score first, then smaller id), and while offering, the bound must never drop a pair that
// belongs there. Built and run by test_topk_heap.py (with AddressSanitizer and UBSan under make
// sanitize); prints "ok: N cases" and exits 0 when every case passes.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "cpu/topk_heap.h"

namespace {

using opqn::cpu::ScoredId;
using opqn::cpu::TopK;

bool before(const ScoredId& a, const ScoredId& b) {
  return a.score > b.score || (a.score == b.score && a.id < b.id);
}

[[noreturn]] void fail(const char* what, int64_t n, int64_t k, int dist, bool shuffled) {
  std::fprintf(stderr, "FAIL %s: n=%ld k=%ld distribution=%d shuffled=%d\n", what, static_cast<long>(n),
               static_cast<long>(k), dist, shuffled ? 1 : 0);
  std::exit(1);
}

float draw_score(std::mt19937& rng, int dist) {
  switch (dist) {
    case 0: return static_cast<float>(std::uniform_int_distribution<int>(0, 3)(rng));  // few values
    case 1: return std::uniform_real_distribution<float>(-1.0f, 1.0f)(rng);           // distinct
    case 2: {  // signed zeros, infinities, the largest floats and their neighbours
      static const float values[] = {0.0f, -0.0f, std::numeric_limits<float>::infinity(),
                                     -std::numeric_limits<float>::infinity(), std::numeric_limits<float>::max(),
                                     std::nextafter(std::numeric_limits<float>::max(), 0.0f), -1e-38f, 1e-45f};
      return values[std::uniform_int_distribution<int>(0, 7)(rng)];
    }
    default: return static_cast<float>(std::uniform_int_distribution<int>(900, 1300)(rng));  // 4-bit sums
  }
}

// Offers the pairs one by one, as a scan would; the kept pairs must be the best k in result order.
void check(std::vector<ScoredId> pairs, int64_t k, int dist, bool shuffled, std::mt19937& rng) {
  const int64_t n = static_cast<int64_t>(pairs.size());
  if (shuffled) std::shuffle(pairs.begin(), pairs.end(), rng);
  std::vector<ScoredId> storage(static_cast<size_t>(2 * k));
  TopK top;
  opqn::cpu::topk_init(top, storage.data(), k);
  std::vector<ScoredId> best = pairs;  // the k best so far, by brute force, every 97 offers
  for (int64_t i = 0; i < n; ++i) {
    opqn::cpu::topk_offer(top, pairs[i].score, pairs[i].id);
    if (top.size > 2 * k) fail("reservoir overflow", n, k, dist, shuffled);
    if (i % 97 == 0 || i == n - 1) {
      best.assign(pairs.begin(), pairs.begin() + i + 1);
      std::sort(best.begin(), best.end(), before);
      best.resize(static_cast<size_t>(std::min<int64_t>(k, i + 1)));
      for (const ScoredId& p : best) {  // each of the best k so far is still kept
        const bool kept = std::any_of(top.entries, top.entries + top.size,
                                      [&](const ScoredId& e) { return e.id == p.id; });
        if (!kept) fail("a pair of the best k was dropped", n, k, dist, shuffled);
      }
      if (static_cast<int64_t>(best.size()) == k && before(top.bound, best.back()))
        fail("bound ranks before the k-th best (it would turn away a pair that belongs)", n, k, dist, shuffled);
    }
  }
  opqn::cpu::topk_finish(top);
  if (top.size != std::min(n, k)) fail("wrong number of pairs kept", n, k, dist, shuffled);
  std::vector<ScoredId> kept(top.entries, top.entries + top.size);
  opqn::cpu::sort_in_result_order(kept.data(), static_cast<int64_t>(kept.size()));
  for (size_t j = 0; j < kept.size(); ++j) {
    if (kept[j].id != best[j].id || !(kept[j].score == best[j].score))
      fail("kept pairs differ from a full sort", n, k, dist, shuffled);
  }
  // keep_best_in_result_order on the whole input gives the same best k, in order
  std::vector<ScoredId> all = pairs;
  opqn::cpu::keep_best_in_result_order(all.data(), n, k);
  for (size_t j = 0; j < kept.size(); ++j) {
    if (all[j].id != best[j].id) fail("keep_best_in_result_order differs from a full sort", n, k, dist, shuffled);
  }
}

}  // namespace

int main() {
  std::mt19937 rng(7);
  int cases = 0;
  for (int64_t n : {1, 2, 5, 64, 257, 1000, 3000}) {
    for (int64_t k : {1, 2, 3, 7, 64, 200, 300, 700}) {
      for (int dist = 0; dist < 4; ++dist) {
        std::vector<ScoredId> pairs(static_cast<size_t>(n));
        for (int64_t i = 0; i < n; ++i) pairs[i] = {draw_score(rng, dist), 3 * i + 1};  // ids increasing
        for (bool shuffled : {false, true}) {
          check(pairs, k, dist, shuffled, rng);
          ++cases;
        }
      }
    }
  }
  std::printf("ok: %d cases\n", cases);
  return 0;
}
