// search_index_file INDEX QUERIES K OUTPUTS [DEVICE [OPTION...]]: loads an index file that
// OPQNIndex.save wrote (opqn_ext/index.h), moves it to DEVICE (default cpu), searches the feature
// queries in QUERIES (a tensor saved with torch.save) for their top K and writes (scores, ids,
// tables) to OUTPUTS, on the CPU, readable by torch.load. Options:
//   map           load the per-item arrays mapped
//   luts          QUERIES holds query tables [nq, M, K] (search_luts; the tables written are those)
//   fast=RERANK   the 4-bit scan (SearchOptions::fast_scan) with this rerank
//   batch=B       SearchOptions::batch_size
//   subset=FILE   search among the ids in FILE (a tensor saved with torch.save)
//   restricted    with subset: search Index::restricted(ids) instead of SearchOptions::subset
//   range=SCORE   range_search(queries, SCORE, subset) instead: OUTPUTS holds (lims, scores, ids)
// Prints whether the process maps the file (/proc/self/maps). An error goes to stderr as
// "error: <message>" with exit status 1.
#include <filesystem>
#include <fstream>
#include <iostream>
#include <optional>
#include <string>

#include <opqn_ext/index.h>

#include "pickled_files.h"

namespace {

bool maps_file(const char* path) {
  const std::string file = std::filesystem::canonical(path).string();
  std::ifstream maps("/proc/self/maps");
  for (std::string line; std::getline(maps, line);)
    if (line.ends_with(" " + file)) return true;
  return false;
}

struct Options {
  bool map = false, luts = false, restricted = false;
  opqn_ext::SearchOptions search;
  std::optional<double> range;
};

// The options after DEVICE, or nothing for a word that is not one.
std::optional<Options> parse_options(int argc, char** argv) {
  Options options;
  for (int i = 6; i < argc; ++i) {
    const std::string word = argv[i], value = word.substr(word.find('=') + 1);
    if (word == "map") options.map = true;
    else if (word == "luts") options.luts = true;
    else if (word == "restricted") options.restricted = true;
    else if (word.starts_with("fast=")) options.search.fast_scan = true, options.search.rerank = std::stoll(value);
    else if (word.starts_with("batch=")) options.search.batch_size = std::stoll(value);
    else if (word.starts_with("subset=")) options.search.subset = load_pickled(value.c_str()).toTensor();
    else if (word.starts_with("range=")) options.range = std::stod(value);
    else return std::nullopt;
  }
  return options;
}

}  // namespace

int main(int argc, char** argv) {
  const std::optional<Options> options = argc >= 5 ? parse_options(argc, argv) : std::nullopt;
  if (!options) {
    std::cerr << "usage: search_index_file INDEX QUERIES K OUTPUTS [DEVICE [map|luts|restricted|fast=R|batch=B|"
                 "subset=FILE|range=SCORE ...]]\n";
    return 2;
  }
  try {
    const at::Tensor queries = load_pickled(argv[2]).toTensor();
    opqn_ext::Index index =
        opqn_ext::Index::load(argv[1], true, options->map).to(c10::Device(argc >= 6 ? argv[5] : "cpu"));
    opqn_ext::SearchOptions search = options->search;
    if (options->restricted) {
      index = index.restricted(search.subset);
      search.subset = at::Tensor();
    }
    if (options->range) {
      const opqn_ext::RangeResult found = index.range_search(queries, *options->range, search.subset);
      save_pickled(argv[4], {found.lims, found.scores, found.ids});
    } else {
      const int64_t k = std::stoll(argv[3]);
      const auto [scores, ids] =
          options->luts ? index.search_luts(queries, k, search) : index.search(queries, k, search);
      save_pickled(argv[4], {scores, ids, options->luts ? queries : index.query_lut(queries).cpu()});
    }
    std::cout << "searched " << index.size() << " items (file mapped: " << (maps_file(argv[1]) ? "yes" : "no")
              << ")\n";
  } catch (const c10::Error& e) {
    std::cerr << "error: " << e.what_without_backtrace() << "\n";
    return 1;
  }
  return 0;
}
