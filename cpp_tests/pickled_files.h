// The files torch.save writes and torch.load reads, for the C++ test and benchmark programs.
#pragma once

#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

#include <torch/csrc/jit/serialization/pickle.h>

// The value saved in the file at `path` (a tensor, a tuple, a list).
inline c10::IValue load_pickled(const char* path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(std::string("cannot read ") + path);
  return torch::jit::pickle_load({std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()});
}

// Writes `values` as a tuple to the file at `path`.
inline void save_pickled(const char* path, std::vector<c10::IValue> values) {
  const std::vector<char> bytes = torch::jit::pickle_save(c10::ivalue::Tuple::create(std::move(values)));
  std::ofstream(path, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}
