// search_index_file INDEX QUERIES K OUTPUTS [DEVICE [map]]: loads an index file that OPQNIndex.save
// wrote (opqn_ext/index.h; with "map", its per-item arrays mapped), moves it to DEVICE (default cpu), searches the feature queries in QUERIES (a
// tensor saved with torch.save) for their top K and writes (scores, ids, tables) to OUTPUTS, on the
// CPU, readable by torch.load. Prints whether the process maps the file (/proc/self/maps). An error goes to stderr as "error: <message>" with exit status 1.
#include <filesystem>
#include <fstream>
#include <iostream>
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

}  // namespace

int main(int argc, char** argv) {
  if (argc < 5 || argc > 7 || (argc == 7 && std::string(argv[6]) != "map")) {
    std::cerr << "usage: search_index_file INDEX QUERIES K OUTPUTS [DEVICE [map]]\n";
    return 2;
  }
  try {
    const at::Tensor queries = load_pickled(argv[2]).toTensor();
    const opqn_ext::Index index =
        opqn_ext::Index::load(argv[1], true, argc == 7).to(c10::Device(argc >= 6 ? argv[5] : "cpu"));
    const auto [scores, ids] = index.search(queries, std::stoll(argv[3]));
    const at::Tensor tables = index.query_lut(queries).cpu();
    save_pickled(argv[4], {scores, ids, tables});
    std::cout << "searched " << index.size() << " items (file mapped: " << (maps_file(argv[1]) ? "yes" : "no")
              << ")\n";
  } catch (const c10::Error& e) {
    std::cerr << "error: " << e.what_without_backtrace() << "\n";
    return 1;
  }
  return 0;
}
