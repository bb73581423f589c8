// Host emulation of the CUDA block top-k selection (csrc/cuda/block_select.cuh): runs the phases
// the GPU runs, one emulated thread after another between barriers, on keys laid out as the
// adc_select kernel lays them out, and checks the selected keys against a full sort. Also checks
// the rank keys' order and decoding. Built and run by test_block_select.py; prints "ok" and exits
// 0 when every case passes.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <vector>

#include "cuda/block_select.cuh"

namespace {

using opqn::cuda::kNoKey;

struct HostBlock {
  int size;
  template <class F>
  void each(const F& f) const {
    for (int tid = 0; tid < size; ++tid) f(tid);
  }
  void sync() const {}
  int threads() const { return size; }
};

[[noreturn]] void fail(const char* what, int threads, uint32_t n_valid, uint32_t k, int dist) {
  std::fprintf(stderr, "FAIL %s: threads=%d n_valid=%u k=%u distribution=%d\n", what, threads, n_valid, k, dist);
  std::exit(1);
}

float draw_score(std::mt19937& rng, int dist) {
  std::uniform_int_distribution<int> small(0, 3);
  std::uniform_real_distribution<float> unit(0.0f, 8.0f);
  switch (dist) {
    case 0: return unit(rng);                                  // sums of probabilities
    case 1: return static_cast<float>(small(rng));             // many ties
    case 2: return 0.5f;                                       // all equal
    case 3: return std::nextafter(1.0f, 2.0f * small(rng));    // differ in the last bits only
    default: {                                                 // signs, zeros, extremes
      const float specials[] = {-0.0f, 0.0f, -1.5f, 1.5f, 1e-42f, -1e-42f, 3e38f, -3e38f,
                                std::numeric_limits<float>::infinity(),
                                -std::numeric_limits<float>::infinity()};
      return specials[std::uniform_int_distribution<int>(0, 9)(rng)];
    }
  }
}

template <int kItems>
void check_case(std::mt19937& rng, int threads, uint32_t n_valid, uint32_t k, int dist) {
  // keys[tid][j]: position j * threads + tid, as the kernel assigns codes to threads
  std::vector<uint64_t> keys(static_cast<size_t>(threads) * kItems, kNoKey);
  std::vector<uint64_t> all;
  for (uint32_t pos = 0; pos < n_valid; ++pos) {
    const uint64_t key = opqn::cuda::rank_key(draw_score(rng, dist), pos);
    keys[static_cast<size_t>(pos % threads) * kItems + pos / threads] = key;
    all.push_back(key);
  }
  opqn::cuda::BlockSelect st;
  std::memset(&st, 0xAB, sizeof st);  // shared memory starts with whatever was there
  std::vector<uint64_t> out(k, 12345);
  std::vector<int> hits(k, 0);
  opqn::cuda::block_select_largest<kItems>(
      HostBlock{threads}, st,
      [&](int tid, int j) { return keys[static_cast<size_t>(tid) * kItems + j]; }, n_valid, k,
      [&](uint32_t slot, uint64_t key) {
        if (slot >= k) fail("slot out of range", threads, n_valid, k, dist);
        out[slot] = key;
        ++hits[slot];
      });
  if (std::any_of(hits.begin(), hits.end(), [](int h) { return h != 1; })) {
    fail("a slot was not written exactly once", threads, n_valid, k, dist);
  }
  std::sort(all.begin(), all.end(), std::greater<>());
  all.resize(std::min<size_t>(all.size(), k));
  all.resize(k, kNoKey);
  std::sort(out.begin(), out.end(), std::greater<>());
  if (out != all) fail("selected keys differ from the k largest", threads, n_valid, k, dist);
}

void check_keys(std::mt19937& rng) {
  for (int i = 0; i < 200000; ++i) {
    const int dist = i % 5;
    const float a = draw_score(rng, dist), b = draw_score(rng, dist);
    const uint32_t pa = rng() % 1000, pb = rng() % 1000;
    const uint64_t ka = opqn::cuda::rank_key(a, pa), kb = opqn::cuda::rank_key(b, pb);
    const bool a_first = a > b || (a == b && pa < pb);
    const bool b_first = b > a || (a == b && pb < pa);
    if ((ka > kb) != a_first || (kb > ka) != b_first) fail("rank key order", 0, pa, pb, dist);
    if (opqn::cuda::key_position(ka) != pa || !(opqn::cuda::key_score(ka) == a)) {
      fail("rank key decoding", 0, pa, pb, dist);
    }
    if (opqn::cuda::unsigned_key(opqn::cuda::signed_key(ka)) != ka ||
        ((opqn::cuda::signed_key(ka) > opqn::cuda::signed_key(kb)) != (ka > kb))) {
      fail("signed key order", 0, pa, pb, dist);
    }
  }
  if (opqn::cuda::rank_key(-3e38f, opqn::cuda::kMaxPosition) == kNoKey) fail("a real key is kNoKey", 0, 0, 0, 0);
}

}  // namespace

int main() {
  std::mt19937 rng(20261128);
  check_keys(rng);
  int cases = 0;
  const uint32_t ks[] = {1, 2, 7, 10, 100, 255, 256, 1000, 1024};
  for (int dist = 0; dist < 5; ++dist) {
    for (const uint32_t k : ks) {
      const uint32_t full = 256 * 16;
      const uint32_t sizes[] = {1, k > 1 ? k - 1 : 1, k, k + 1, 2 * k + 3, 1000, full - 17, full};
      for (const uint32_t n : sizes) {
        if (n > full) continue;
        check_case<16>(rng, 256, n, k, dist);
        ++cases;
      }
      if (k <= 64 * 4) {
        check_case<4>(rng, 64, std::min<uint32_t>(64 * 4, 3 * k + 1), k, dist);
        ++cases;
      }
    }
  }
  std::printf("ok: %d selection cases\n", cases);
  return 0;
}
