// What the index-file code (index_file.cpp: load; index_search.cpp; index_add.cpp; index_save.cpp) shares:
// the file format's names and arrays, and the checks OPQNIndex makes in Python (opqn_ext/index.py).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <nlohmann/json.hpp>

#include "opqn_ext/index.h"

namespace opqn_ext::index_format {

inline constexpr const char* kFormat = "opqn-index";
inline constexpr int64_t kFormatVersion = 1;
inline constexpr const char* kMetadataKey = "opqn_index";  // safetensors metadata entry of our header

struct ArraySpec {
  const char* name;
  const char* dtype;  // safetensors' name of its dtype
  at::ScalarType type;
};
// The arrays of a file, in the order save writes them (8-byte items first: each stays aligned).
inline constexpr ArraySpec kArrays[] = {{"ids", "I64", at::kLong},
                                        {"labels", "I64", at::kLong},
                                        {"assign_weight", "F32", at::kFloat},
                                        {"codebook", "F32", at::kFloat},
                                        {"codes", "U8", at::kByte}};

// The array of `index` (an Index, const or not) that the file's array `name` holds.
template <typename IndexType>
auto& array_of(IndexType& index, std::string_view name) {
  if (name == "codes") return index.codes;
  if (name == "ids") return index.ids;
  if (name == "labels") return index.labels;
  return name == "assign_weight" ? index.assign_weight : index.codebook;
}

// An index's settings (the text of a JSON object) parsed, or an error naming `settings`.
nlohmann::json settings_object(const std::string& settings);

// The CRC-32 (zlib's, as Python's zlib.crc32) of a contiguous CPU tensor's bytes.
uint32_t crc32_of(const at::Tensor& array);

// Whether every book's C_m^T C_m is within 1e-4 of the identity (OPQNIndex's test, in float64).
bool is_orthonormal(const at::Tensor& codebook);

// "[3, 7]" of int64 values [n]: at most ten, then "and N more".
std::string list_of(const at::Tensor& values);

// "rows [3, 7]" of row numbers [n], as the Python index names them.
inline std::string rows_of(const at::Tensor& rows) { return "rows " + list_of(rows); }

// `current ++ rows`, kept as a prefix of `room`: rows go into room's spare rows; where there are too
// few, or `current` is not room's prefix, a new room with half as many rows again takes over.
at::Tensor append_rows(const at::Tensor& current, at::Tensor& room, const at::Tensor& rows);

// Any-shape `ids` of an integer dtype as int64 [n] on the CPU, or an error naming `name`.
at::Tensor integer_ids(const at::Tensor& ids, const char* name = "ids");

// (positions, whether found) of `ids` [n] int64 in `held` [N] (sorted); positions of ids not found
// are any valid position (0 where nothing is held).
std::pair<at::Tensor, at::Tensor> find(const at::Tensor& held, const at::Tensor& ids);

// The rows [n] of values [n, ...] that hold NaN or infinite values.
at::Tensor rows_not_finite(const at::Tensor& values);

}  // namespace opqn_ext::index_format
