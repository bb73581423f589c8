// time_index_search INDEX QUERIES K CALLS [fast|range=SCORE]: the time of opqn_ext::Index searches
// from C++ (no Python): loads an index file, searches the feature queries saved in QUERIES
// (torch.save of [nq, D]) for their top K (with "fast": the 4-bit scan, SearchOptions::fast_scan;
// with "range=SCORE": every item scoring at least SCORE, range_search), CALLS times in each of 7
// rounds after a warm-up, and prints the first query's ids (for the caller to check against
// Python's) and the best round's microseconds per call.
#include <algorithm>
#include <chrono>
#include <functional>
#include <iostream>
#include <string>

#include <opqn_ext/index.h>

#include "pickled_files.h"

int main(int argc, char** argv) {
  const std::string mode = argc == 6 ? argv[5] : "";
  if ((argc != 5 && argc != 6) || (argc == 6 && mode != "fast" && !mode.starts_with("range="))) {
    std::cerr << "usage: time_index_search INDEX QUERIES K CALLS [fast|range=SCORE]\n";
    return 2;
  }
  const at::Tensor queries = load_pickled(argv[2]).toTensor();
  const opqn_ext::Index index = opqn_ext::Index::load(argv[1]);
  const int64_t k = std::stoll(argv[3]), calls = std::stoll(argv[4]);
  opqn_ext::SearchOptions options;
  options.fast_scan = mode == "fast";
  at::Tensor first_ids;  // the first query's
  std::function<void()> search;
  if (mode.starts_with("range=")) {
    const double min_score = std::stod(mode.substr(6));
    const opqn_ext::RangeResult found = index.range_search(queries, min_score);
    first_ids = found.ids.narrow(0, 0, found.lims[1].item<int64_t>());
    search = [&] { index.range_search(queries, min_score); };
  } else {
    first_ids = std::get<1>(index.search(queries, k, options))[0];
    search = [&] { index.search(queries, k, options); };
  }
  for (int64_t j = 0; j < first_ids.size(0); ++j) std::cout << (j ? " " : "") << first_ids[j].item<int64_t>();
  std::cout << "\n";
  for (int64_t i = 0; i < std::min<int64_t>(calls, 100); ++i) search();
  double best = 1e30;
  for (int round = 0; round < 7; ++round) {
    const auto start = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < calls; ++i) search();
    const std::chrono::duration<double, std::micro> took = std::chrono::steady_clock::now() - start;
    best = std::min(best, took.count() / static_cast<double>(calls));
  }
  std::cout << best << "\n";
  return 0;
}
