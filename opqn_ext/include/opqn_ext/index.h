// Index files for C++ programs (libtorch, no Python): read what OPQNIndex.save wrote (format
// "opqn-index", version 1: a safetensors file whose metadata holds the index header), search it as
// OPQNIndex.search, search_luts and range_search do (the 4-bit scan and subsets too), with the same
// kernels, so the results are the Python index's, bit for bit; add items as OPQNIndex.add does and
// save files that OPQNIndex.load reads. Part of opqn_ext_ops where its build (CMake or setup.py)
// found nlohmann/json.hpp and zlib (OPQN_WITH_INDEX_FILES); then OPQN_EXT_INDEX_FILES is defined for
// programs linking opqn_ext::opqn_ext_ops. Every problem (a missing, truncated or corrupted file,
// bad queries or items) throws c10::Error saying what.
#pragma once

#ifndef OPQN_EXT_INDEX_FILES
#error "this opqn_ext library was built without its index files (opqn_ext/index.h): rebuild it where \
nlohmann/json.hpp (pip install nlohmann-json) and zlib are found, with OPQN_WITH_INDEX_FILES=1"
#endif

#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include "opqn_ext/ops.h"

namespace opqn_ext {

// The id that search returns where fewer than k items exist (FAISS's -1); no item has it.
inline constexpr int64_t kNoId = -1;

// How Index::search scans (OPQNIndex.search's keyword arguments).
struct SearchOptions {
  // Ids of the items to search among (any shape, any integer dtype; ids the index lacks are
  // ignored), as FAISS's ID selector; undefined: every item. Their codes are gathered and scanned.
  at::Tensor subset;
  // K <= 16: the 4-bit scan (adc_topk4) of the codes' packed layout, which the index keeps and
  // extends as items are appended. On the CPU the top rerank * k approximate (8-bit table) scores
  // are re-scored exactly; on CUDA the packed codes are scanned exactly.
  bool fast_scan = false;
  int64_t rerank = 2;
  int64_t batch_size = 4096;  // queries whose tables are made and scanned at a time (bounded memory)
};

// Every item at or above a score for each query, as FAISS returns ranges: query q's results are
// scores[lims[q]:lims[q + 1]] (descending, ties to the smaller id) and the ids beside them.
struct RangeResult {
  at::Tensor lims;    // [nq + 1] int64
  at::Tensor scores;  // [lims[nq]] float32
  at::Tensor ids;     // [lims[nq]] int64
};

// Const methods may run at once from several threads; add, remove and save need the index alone.
// To change the arrays yourself, assign new tensors: fast-scan searches keep a packed layout of the
// codes array, which writes into it would not reach.
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

  // Why the codes of `other` do not compare with this index's queries ("" when they do): its
  // shapes, assignment weights, codebook, query scale or table kind differ.
  std::string model_mismatch(const Index& other) const;

  // Adds every item of `other` (an index of the same model) under its id plus `id_offset`, with its
  // label (FAISS's merge_from: parts of a gallery built apart become one); returns the ids added
  // (increasing). Another model's index, or an id held already, is refused.
  at::Tensor merge_from(const Index& other, int64_t id_offset = 0);

  // Removes the items with these ids (any shape, any integer dtype); returns how many were held.
  int64_t remove(const at::Tensor& ids);

  // Whether each of `ids` (any shape, any integer dtype) is the id of an item (bool, same shape).
  at::Tensor contains(const at::Tensor& ids) const;

  // The labels of the items of `ids` (any shape, any integer dtype; int64, same shape); -1 for ids
  // not held. The labels of search results: labels_of(ids) (kNoId gives -1).
  at::Tensor labels_of(const at::Tensor& ids) const;

  // The vectors [n, M*d] float32 that the items of `ids` (any shape, n in all) stand for: per book,
  // the codeword of its code (a query's score of an item is the product of its soft-quantized
  // sub-vectors with these). Ids not held are refused.
  at::Tensor reconstruct(const at::Tensor& ids) const;

  // Top-k of feature queries [nq, M*d], k >= 1: (scores [nq, k] float32 descending, ids [nq, k]
  // int64), ties to the smaller id; places beyond the items searched hold score -inf and id kNoId.
  std::tuple<at::Tensor, at::Tensor> search(const at::Tensor& features, int64_t k,
                                            const SearchOptions& options = {}) const;

  // Top-k of precomputed query tables [nq, M, K] (any floating dtype, cast to float32).
  std::tuple<at::Tensor, at::Tensor> search_luts(const at::Tensor& luts, int64_t k,
                                                 const SearchOptions& options = {}) const;

  // Every item scoring at least `min_score` for each feature query [nq, M*d] (open-set
  // identification), among the ids of `subset` if defined (as SearchOptions::subset), with
  // OPQNIndex.range_search's results: a top-64 scan holds all of a query's results when its last
  // score is below min_score; queries whose top-k is full get scans of 16 times larger k, up to
  // 1024; every score is computed for those still full, `batch_bytes` of scores at a time.
  RangeResult range_search(const at::Tensor& features, double min_score, const at::Tensor& subset = {},
                           int64_t batch_bytes = int64_t(64) << 20) const;

  // A new index of the items whose ids are in `ids` (others ignored), with this index's model and
  // settings: for many searches among one large subset.
  Index restricted(const at::Tensor& ids) const;

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

  // The 4-bit layout of the codes for fast_scan, made on the first such search and extended by
  // later ones over the codes appended since (its whole blocks of 32 codes kept). It describes the
  // codes array it was made from (known by its storage, held weakly so that it is freed with the
  // codes) while that array only grows; another array is packed anew (codes changed in place are
  // not seen). A copy of an index starts without one (the layout's spare rows are never shared).
  struct PackedCache {
    struct Layout {
      std::shared_ptr<const PackedCodes4> packed;
      c10::weak_intrusive_ptr<c10::StorageImpl> source{c10::intrusive_ptr<c10::StorageImpl>()};
      const void* source_data = nullptr;
      at::Tensor room;  // [blocks, ceil(M/2), 32] uint8: packed->data is its prefix
    };
    std::mutex mutex;
    Layout layout;
    PackedCache() = default;
    PackedCache(const PackedCache&) {}
    PackedCache& operator=(const PackedCache&) {
      std::lock_guard<std::mutex> lock(mutex);
      layout = Layout();
      return *this;
    }
  };
  mutable PackedCache packed_;

  // Adds rows already checked (codes < K, ids unique and new to the index); `in_order`: the ids
  // increase and follow every id held, so the rows are appended, not sorted in.
  void insert(const at::Tensor& codes, const at::Tensor& ids, const at::Tensor& labels, bool in_order);
  // The packed layout of the codes (made or extended here).
  std::shared_ptr<const PackedCodes4> packed_codes() const;
  // After an append: the layout made from `before` describes the first rows of `after`.
  void packed_follows(const at::Tensor& before, const at::Tensor& after);
  // search and search_luts: top-k of feature queries or of tables.
  std::tuple<at::Tensor, at::Tensor> scan(const at::Tensor& luts_or_features, bool features, int64_t k,
                                          const SearchOptions& options) const;
};

}  // namespace opqn_ext
