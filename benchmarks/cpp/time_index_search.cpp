// time_index_search INDEX QUERY K CALLS: the latency of opqn_ext::Index::search from C++ (no
// Python): loads an index file, searches the feature query saved in QUERY (torch.save of [1, D])
// for its top K, CALLS times in each of 7 rounds after a warm-up, and prints the query's ids (for
// the caller to check against Python's) and the best round's microseconds per search.
#include <algorithm>
#include <chrono>
#include <iostream>
#include <string>

#include <opqn_ext/index.h>

#include "pickled_files.h"

int main(int argc, char** argv) {
  if (argc != 5) {
    std::cerr << "usage: time_index_search INDEX QUERY K CALLS\n";
    return 2;
  }
  const at::Tensor query = load_pickled(argv[2]).toTensor();
  const opqn_ext::Index index = opqn_ext::Index::load(argv[1]);
  const int64_t k = std::stoll(argv[3]), calls = std::stoll(argv[4]);
  const auto [scores, ids] = index.search(query, k);
  for (int64_t j = 0; j < k; ++j) std::cout << ids[0][j].item<int64_t>() << (j + 1 < k ? " " : "\n");
  for (int64_t i = 0; i < std::min<int64_t>(calls, 100); ++i) index.search(query, k);
  double best = 1e30;
  for (int round = 0; round < 7; ++round) {
    const auto start = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < calls; ++i) index.search(query, k);
    const std::chrono::duration<double, std::micro> took = std::chrono::steady_clock::now() - start;
    best = std::min(best, took.count() / static_cast<double>(calls));
  }
  std::cout << best << "\n";
  return 0;
}
