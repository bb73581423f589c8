// Index files for C++ programs (libtorch, no Python): read what OPQNIndex.save wrote (format
// "opqn-index", version 1: a safetensors file whose metadata holds the index header) and search it
// as OPQNIndex.search does, with the same kernels, so the results are the Python index's, bit for
// bit. Part of opqn_ext_ops where CMake found nlohmann/json.hpp and zlib (OPQN_WITH_INDEX_READER);
// then OPQN_EXT_INDEX_READER is defined for programs linking opqn_ext::opqn_ext_ops. Every
// problem (a missing, truncated or corrupted file, bad queries) throws c10::Error saying what.
#pragma once

#include <cstdint>
#include <string>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include "opqn_ext/ops.h"

namespace opqn_ext {

// The id that search returns where fewer than k items exist (FAISS's -1); no item has it.
inline constexpr int64_t kNoId = -1;

struct OPQN_EXT_API Index {
  at::Tensor codes;          // [N, M] uint8
  at::Tensor ids;            // [N] int64, strictly increasing (on the CPU)
  at::Tensor labels;         // [N] int64 (on the CPU)
  at::Tensor assign_weight;  // [M, d, K] float32
  at::Tensor codebook;       // [M, d, K] float32
  double query_scale = 1.0;  // the softmax scale of query tables
  bool orthonormal = true;   // tables are the assignment probabilities (else products with the codebook)

  // Reads an index file; `verify` checks every array's CRC-32 (one pass over the file).
  static Index load(const std::string& path, bool verify = true);

  int64_t size() const { return codes.size(0); }

  // This index with its codes and model on `device` (ids and labels stay on the CPU).
  Index to(const c10::Device& device) const;

  // Query tables [nq, M, K] float32 of features [nq, M*d] (any dtype, cast to float32 as in Python).
  at::Tensor query_lut(const at::Tensor& features) const;

  // Top-k of feature queries [nq, M*d], k >= 1: (scores [nq, k] float32 descending, ids [nq, k]
  // int64), ties to the smaller id; places beyond the items hold score -inf and id kNoId.
  std::tuple<at::Tensor, at::Tensor> search(const at::Tensor& features, int64_t k) const;
};

}  // namespace opqn_ext
