// load_index_files verify|noverify map|read FILE...: loads each index file (Index::load with the
// CRC-32 check or not, its per-item arrays mapped or read) and, where it loads, searches it for two
// random queries (top 3, exact and, for K <= 16, the 4-bit scan; then range search): a damaged file
// must give an error naming it, never a crash or an out-of-bounds read. Prints one line per file,
// "ok N" (N items) or "error: <the message's first line>"; exits 0 when every file was handled.
#include <iostream>
#include <string>

#include <ATen/ops/randn.h>
#include <opqn_ext/index.h>

int main(int argc, char** argv) {
  const std::string verify = argc > 2 ? argv[1] : "", read = argc > 2 ? argv[2] : "";
  if (argc < 3 || (verify != "verify" && verify != "noverify") || (read != "map" && read != "read")) {
    std::cerr << "usage: load_index_files verify|noverify map|read FILE...\n";
    return 2;
  }
  for (int i = 3; i < argc; ++i) {
    try {
      const opqn_ext::Index index = opqn_ext::Index::load(argv[i], verify == "verify", read == "map");
      const at::Tensor queries = at::randn({2, index.codes.size(1) * index.codebook.size(1)});
      index.search(queries, 3);
      if (index.codebook.size(2) <= 16) {
        opqn_ext::SearchOptions fast;
        fast.fast_scan = true;
        index.search(queries, 3, fast);
      }
      index.range_search(queries, 0.5);
      std::cout << "ok " << index.size() << std::endl;  // flushed: a crash shows after which file
    } catch (const c10::Error& e) {
      const std::string message = e.what_without_backtrace();
      std::cout << "error: " << message.substr(0, message.find('\n')) << std::endl;
    }
  }
  return 0;
}
