// search_index_file INDEX QUERIES K OUTPUTS [DEVICE]: loads an index file that OPQNIndex.save wrote
// (opqn_ext/index.h), moves it to DEVICE (default cpu), searches the feature queries in QUERIES (a
// tensor saved with torch.save) for their top K and writes (scores, ids, tables) to OUTPUTS, on the
// CPU, readable by torch.load. An error goes to stderr as "error: <message>" with exit status 1.
#include <iostream>
#include <string>

#include <opqn_ext/index.h>

#include "pickled_files.h"

int main(int argc, char** argv) {
  if (argc != 5 && argc != 6) {
    std::cerr << "usage: search_index_file INDEX QUERIES K OUTPUTS [DEVICE]\n";
    return 2;
  }
  try {
    const at::Tensor queries = load_pickled(argv[2]).toTensor();
    const opqn_ext::Index index = opqn_ext::Index::load(argv[1]).to(c10::Device(argc == 6 ? argv[5] : "cpu"));
    const auto [scores, ids] = index.search(queries, std::stoll(argv[3]));
    const at::Tensor tables = index.query_lut(queries).cpu();
    save_pickled(argv[4], {scores, ids, tables});
    std::cout << "searched " << index.size() << " items\n";
  } catch (const c10::Error& e) {
    std::cerr << "error: " << e.what_without_backtrace() << "\n";
    return 1;
  }
  return 0;
}
