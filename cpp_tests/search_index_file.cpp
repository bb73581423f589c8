// search_index_file INDEX QUERIES K OUTPUTS [DEVICE]: loads an index file that OPQNIndex.save wrote
// (opqn_ext/index.h), moves it to DEVICE (default cpu), searches the feature queries in QUERIES (a
// tensor saved with torch.save) for their top K and writes (scores, ids, tables) to OUTPUTS, on the
// CPU, readable by torch.load. An error goes to stderr as "error: <message>" with exit status 1.
#include <fstream>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

#include <opqn_ext/index.h>
#include <torch/csrc/jit/serialization/pickle.h>

int main(int argc, char** argv) {
  if (argc != 5 && argc != 6) {
    std::cerr << "usage: search_index_file INDEX QUERIES K OUTPUTS [DEVICE]\n";
    return 2;
  }
  try {
    std::ifstream in(argv[2], std::ios::binary);
    const std::vector<char> bytes{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
    const at::Tensor queries = torch::jit::pickle_load(bytes).toTensor();
    const opqn_ext::Index index = opqn_ext::Index::load(argv[1]).to(c10::Device(argc == 6 ? argv[5] : "cpu"));
    const auto [scores, ids] = index.search(queries, std::stoll(argv[3]));
    const at::Tensor tables = index.query_lut(queries).cpu();
    const std::vector<char> out = torch::jit::pickle_save(c10::ivalue::Tuple::create({scores, ids, tables}));
    std::ofstream(argv[4], std::ios::binary).write(out.data(), static_cast<std::streamsize>(out.size()));
    std::cout << "searched " << index.size() << " items\n";
  } catch (const c10::Error& e) {
    std::cerr << "error: " << e.what_without_backtrace() << "\n";
    return 1;
  }
  return 0;
}
