// Index files for C++ programs (libtorch, no Python): read what OPQNIndex.save wrote (format
// "opqn-index", version 1: a safetensors file whose metadata holds the index header), search it as
// OPQNIndex.search does, with the same kernels, so the results are the Python index's, bit for
// bit; add items as OPQNIndex.add does and save files that OPQNIndex.load reads. Part of
// opqn_ext_ops where CMake found nlohmann/json.hpp and zlib (OPQN_WITH_INDEX_FILES); then
// OPQN_EXT_INDEX_FILES is defined for programs linking opqn_ext::opqn_ext_ops. Every problem (a
// missing, truncated or corrupted file, bad queries or items) throws c10::Error saying what.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include "opqn_ext/ops.h"

namespace opqn_ext {

// The id that search returns where fewer than k items exist (FAISS's -1); no item has it.
inline constexpr int64_t kNoId = -1;

// Const methods may run at once from several threads; add, remove and save need the index alone.
struct OPQN_EXT_API Index {
  at::Tensor codes;          // [N, M] uint8
  at::Tensor ids;            // [N] int64, strictly increasing (on the CPU)
  at::Tensor labels;         // [N] int64 (on the CPU)
  at::Tensor assign_weight;  // [M, d, K] float32
  at::Tensor codebook;       // [M, d, K] float32
  double query_scale = 1.0;  // the softmax scale of query tables
  bool orthonormal = true;   // tables are the assignment probabilities (else products with the codebook)
  std::string settings = "{}";  // the model settings kept with the index: the text of a JSON object

  // An empty index of a model (OPQNIndex's constructor): assign_weight and codebook [M, d, K <= 256],
  // finite, on the device the codes will be; `orthonormal` unset: whether every C_m^T C_m is within
  // 1e-4 of the identity.
  static Index create(const at::Tensor& assign_weight, const at::Tensor& codebook, double query_scale,
                      std::optional<bool> orthonormal = std::nullopt, std::string settings = "{}");

  // Reads an index file; `verify` checks every array's CRC-32 (one pass over the file). `map`: the
  // codes, ids and labels stay in the file, mapped copy-on-write (as OPQNIndex.load(mmap=True)), and
  // are paged in by the scans, so an index larger than memory can be searched; the file must then
  // not be truncated while the index (or a copy) lives (Index::save and OPQNIndex.save replace it).
  static Index load(const std::string& path, bool verify = true, bool map = false);

  // Writes the index to `path` as OPQNIndex.save does: a temporary file next to it, flushed to disk
  // and renamed over it (a crash leaves the previous file whole); it keeps the permissions of the
  // file it replaces.
  void save(const std::string& path) const;

  int64_t size() const { return codes.size(0); }

  // This index with its codes and model on `device` (ids and labels stay on the CPU).
  Index to(const c10::Device& device) const;

  // Query tables [nq, M, K] float32 of features [nq, M*d] (any dtype, cast to float32 as in Python).
  at::Tensor query_lut(const at::Tensor& features) const;

  // Encodes features [B, M*d] (in batches, cast to float32) and adds them; returns their ids. See
  // add_codes for `ids` and `labels`.
  at::Tensor add(const at::Tensor& features, const at::Tensor& ids = {}, const at::Tensor& labels = {});

  // Adds codes [B, M] uint8 (every value < K) with `ids` [B] (any integer dtype; undefined: those
  // after the largest id held, from 0) and `labels` [B] (undefined: -1); returns the ids (int64).
  // Repeated ids, ids already held and the id kNoId are refused. Ids above every id held are
  // appended in amortized O(B) (the arrays keep spare rows, grown by half when full; a copy of the
  // index never shares them); others are sorted in.
  at::Tensor add_codes(const at::Tensor& codes, const at::Tensor& ids = {}, const at::Tensor& labels = {});

  // Removes the items with these ids (any shape, any integer dtype); returns how many were held.
  int64_t remove(const at::Tensor& ids);

  // Whether each of `ids` (any shape, any integer dtype) is the id of an item (bool, same shape).
  at::Tensor contains(const at::Tensor& ids) const;

  // The labels of the items of `ids` (any shape, any integer dtype; int64, same shape); -1 for ids
  // not held. The labels of search results: labels_of(ids) (kNoId gives -1).
  at::Tensor labels_of(const at::Tensor& ids) const;

  // Top-k of feature queries [nq, M*d], k >= 1: (scores [nq, k] float32 descending, ids [nq, k]
  // int64), ties to the smaller id; places beyond the items hold score -inf and id kNoId.
  std::tuple<at::Tensor, at::Tensor> search(const at::Tensor& features, int64_t k) const;

 private:
  // The arrays codes, ids and labels are prefixes of after an append, with room for more rows. A
  // copy of an index starts without: it never appends into the rows of another.
  struct AppendRoom {
    at::Tensor codes, ids, labels;
    AppendRoom() = default;
    AppendRoom(const AppendRoom&) {}
    AppendRoom& operator=(const AppendRoom&) {
      codes = ids = labels = at::Tensor();
      return *this;
    }
    AppendRoom(AppendRoom&&) = default;
    AppendRoom& operator=(AppendRoom&&) = default;
  };
  AppendRoom room_;
};

}  // namespace opqn_ext
