// time_index_files INDEX FEATURES CODES OUTPUT: the index-file operations of opqn_ext::Index from
// C++ (no Python), each timed once: load INDEX with CRC-32 checks, without them, and mapped without
// them; add FEATURES (torch.save of [B, D]: encode and append) to the index read with checks; then
// add each batch of CODES (torch.save of [batches, rows, M] uint8) in turn; save the index to
// OUTPUT. Prints "name seconds" lines; the caller checks OUTPUT against Python's.
#include <chrono>
#include <functional>
#include <iostream>
#include <string>

#include <opqn_ext/index.h>

#include "pickled_files.h"

namespace {

double seconds(const std::function<void()>& work) {
  const auto start = std::chrono::steady_clock::now();
  work();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 5) {
    std::cerr << "usage: time_index_files INDEX FEATURES CODES OUTPUT\n";
    return 2;
  }
  const at::Tensor features = load_pickled(argv[2]).toTensor();
  const at::Tensor codes = load_pickled(argv[3]).toTensor();
  opqn_ext::Index index;
  std::cout << "load_verified " << seconds([&] { index = opqn_ext::Index::load(argv[1]); }) << "\n";
  std::cout << "load " << seconds([&] { opqn_ext::Index::load(argv[1], false); }) << "\n";
  std::cout << "load_mapped " << seconds([&] { opqn_ext::Index::load(argv[1], false, true); }) << "\n";
  std::cout << "add_features " << seconds([&] { index.add(features); }) << "\n";
  std::cout << "add_code_batches " << seconds([&] {
    for (int64_t b = 0; b < codes.size(0); ++b) index.add_codes(codes[b]);
  }) << "\n";
  std::cout << "save " << seconds([&] { index.save(argv[4]); }) << "\n";
  return 0;
}
