// opqn_ext/index.h: reading index files in the C++ library. The file layout is
// safetensors (8 bytes of little-endian header length, a JSON header naming each array's dtype,
// shape and byte range, then the data); its metadata entry "opqn_index" is our own JSON header
// (format, version, sizes, query scale, codebook kind, each array's CRC-32). Every check of
// OPQNIndex.load (opqn_ext/index.py) is made here too, with the same messages. Built only by CMake
// (it needs nlohmann/json.hpp and zlib), never into the Python module, which reads the files in
// Python.
#include "opqn_ext/index.h"

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/isfinite.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>
#include <nlohmann/json.hpp>

#include "index_format.h"

static_assert(std::endian::native == std::endian::little, "index files hold little-endian arrays");

namespace opqn_ext {
namespace {

using nlohmann::json;

using namespace index_format;

constexpr int64_t kMaxHeaderBytes = int64_t(100) << 20;

// Whether a JSON value is a T: integers for int64_t (not floats, which nlohmann would truncate, nor
// booleans), numbers for double, text for std::string, a list of integers for std::vector<int64_t>.
template <typename T>
bool holds(const json& value) {
  if constexpr (std::is_same_v<T, int64_t>) return value.is_number_integer();
  else if constexpr (std::is_same_v<T, double>) return value.is_number();
  else if constexpr (std::is_same_v<T, std::string>) return value.is_string();
  else return value.is_array() && std::all_of(value.begin(), value.end(), holds<int64_t>);
}

// The JSON member `key` of `object` as T, or an error naming the file and the member.
template <typename T>
T member(const json& object, const char* key, const std::string& path, const char* where) {
  const auto found = object.find(key);  // end() where object is not an object
  TORCH_CHECK(found != object.end(), path, ": corrupted index file header (", where, " has no ", key, ")");
  TORCH_CHECK(holds<T>(*found), path, ": corrupted index file header (", where, " has a ", key, " of the wrong type)");
  return found->get<T>();
}

// The bytes of an array of `shape` and `item_bytes` per entry, or -1 for a shape with a negative
// size or whose sizes (zeros counted as ones) make more than `limit` bytes: a corrupted header must
// not make the reader allocate them, nor make an empty array whose strides overflow.
int64_t bytes_of(const std::vector<int64_t>& shape, int64_t item_bytes, int64_t limit) {
  int64_t bytes = item_bytes;
  bool empty = false;
  for (const int64_t s : shape) {
    if (s < 0) return -1;
    empty = empty || s == 0;
    if (s > 0 && bytes > limit / s) return -1;
    bytes *= std::max<int64_t>(s, 1);
  }
  return empty ? 0 : bytes;
}

// The file at `path` (`size` bytes) mapped copy-on-write: its arrays can be written without changing
// the file, as numpy's mode "c" maps them for OPQNIndex.load. Unmapped when the last holder goes.
std::shared_ptr<void> map_file(const std::string& path, int64_t size) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  TORCH_CHECK(fd >= 0, path, ": cannot open the index file to map it (", std::strerror(errno), ")");
  void* base = ::mmap(nullptr, static_cast<size_t>(size), PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
  const int error = errno;
  ::close(fd);  // the mapping stays
  TORCH_CHECK(base != MAP_FAILED, path, ": cannot map the index file (", std::strerror(error), ")");
  return {base, [size](void* p) { ::munmap(p, static_cast<size_t>(size)); }};
}

}  // namespace

Index Index::load(const std::string& path, bool verify, bool map) {
  std::ifstream file(path, std::ios::binary | std::ios::ate);
  TORCH_CHECK(file.good(), path, ": index file does not exist or cannot be read");
  const int64_t size = file.tellg();
  file.seekg(0);
  uint64_t header_len = 0;
  TORCH_CHECK(size >= 8 && file.read(reinterpret_cast<char*>(&header_len), 8), path, ": truncated index file (",
              size, " bytes)");
  TORCH_CHECK(header_len <= static_cast<uint64_t>(std::min(size - 8, kMaxHeaderBytes)), path,
              ": truncated or corrupted index file (header of ", header_len, " bytes in a ", size, "-byte file)");
  std::string text(header_len, '\0');
  file.read(text.data(), static_cast<std::streamsize>(header_len));
  json layout, header;
  try {
    layout = json::parse(text);
  } catch (const json::parse_error& e) {
    C10_THROW_ERROR(Error, c10::str(path, ": corrupted index file header (", e.what(), ")"));
  }
  TORCH_CHECK(layout.is_object(), path, ": corrupted index file header");
  try {
    header = json::parse(layout.at("__metadata__").at(kMetadataKey).get<std::string>());
  } catch (const json::exception&) {
    C10_THROW_ERROR(Error, c10::str(path, ": not an OPQN index (no opqn_index header)"));
  }
  TORCH_CHECK(header.is_object() && header.value("format", json()) == kFormat, path, ": not an OPQN index (format ",
              header.is_object() ? header.value("format", json()).dump() : "missing", ")");
  const json version = header.value("format_version", json());
  TORCH_CHECK(version == kFormatVersion, path, ": index format version ", version.dump(),
              " is not supported (this opqn_ext reads version ", kFormatVersion, ")");

  const int64_t data_start = 8 + static_cast<int64_t>(header_len);
  Index index;
  std::shared_ptr<void> mapping;  // the file mapped, held by the arrays in it
  const json crcs = header.value("crc32", json::object());
  for (const ArraySpec& spec : kArrays) {
    TORCH_CHECK(layout.contains(spec.name), path, ": array ", spec.name, " is missing");
    const json& info = layout[spec.name];
    const auto offsets = member<std::vector<int64_t>>(info, "data_offsets", path, spec.name);
    const auto shape = member<std::vector<int64_t>>(info, "shape", path, spec.name);
    const auto dtype = member<std::string>(info, "dtype", path, spec.name);
    TORCH_CHECK(dtype == spec.dtype, path, ": array ", spec.name, " has dtype ", dtype, ", not ", spec.dtype);
    TORCH_CHECK(offsets.size() == 2 && offsets[0] >= 0 && offsets[0] <= offsets[1], path,
                ": corrupted index file header (byte range of array ", spec.name, ")");
    // compared without adding to offsets[1], which a damaged header can make overflow int64
    TORCH_CHECK(offsets[1] <= size - data_start, path, ": truncated index file (array ", spec.name,
                " ends at byte ", offsets[1], " of the data, which has ", size - data_start, ")");
    TORCH_CHECK(bytes_of(shape, c10::elementSize(spec.type), size) == offsets[1] - offsets[0], path, ": array ",
                spec.name, " has ", offsets[1] - offsets[0], " bytes for shape ", at::IntArrayRef(shape));
    const bool per_item = spec.name != std::string_view("assign_weight") && spec.name != std::string_view("codebook");
    at::Tensor array;
    if (map && per_item && offsets[1] > offsets[0]) {
      if (!mapping) mapping = map_file(path, size);
      array = at::from_blob(static_cast<char*>(mapping.get()) + data_start + offsets[0], shape,
                            [mapping](void*) {}, at::TensorOptions().dtype(spec.type));
    } else {
      array = at::empty(shape, at::TensorOptions().dtype(spec.type));
      file.seekg(data_start + offsets[0]);
      file.read(static_cast<char*>(array.mutable_data_ptr()), static_cast<std::streamsize>(array.nbytes()));
      TORCH_CHECK(file.good(), path, ": cannot read array ", spec.name);
    }
    if (verify) {
      TORCH_CHECK(crcs.contains(spec.name) && crcs[spec.name].is_number_unsigned() &&
                      crcs[spec.name].get<uint64_t>() == crc32_of(array),
                  path, ": array ", spec.name, " is corrupted (CRC-32 mismatch)");
    }
    array_of(index, spec.name) = array;
  }

  const auto n = member<int64_t>(header, "num_items", path, "the opqn_index header");
  const auto M = member<int64_t>(header, "num_books", path, "the opqn_index header");
  const at::Tensor& A = index.assign_weight;
  TORCH_CHECK(A.dim() == 3 && A.sizes() == index.codebook.sizes() && A.size(0) == M && A.size(2) >= 1 &&
                  A.size(2) <= 256,
              path, ": assign_weight and codebook must both be [M=", M, ", d, K <= 256], got ", A.sizes(), " and ",
              index.codebook.sizes());
  TORCH_CHECK(index.codes.sizes() == at::IntArrayRef({n, M}) && index.ids.sizes() == at::IntArrayRef({n}) &&
                  index.labels.sizes() == at::IntArrayRef({n}),
              path, ": array shapes do not match the header (", n, " items, M=", M, ")");
  TORCH_CHECK(at::isfinite(A).all().item<bool>() && at::isfinite(index.codebook).all().item<bool>(), path,
              ": assign_weight and codebook must be finite");
  const int64_t* ids = index.ids.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(i == 0 || ids[i] > ids[i - 1], path, ": ids are not strictly increasing");
    TORCH_CHECK(ids[i] != kNoId, path, ": holds an item of id ", kNoId, ", which search reserves for missing results");
  }
  index.query_scale = member<double>(header, "query_scale", path, "the opqn_index header");
  TORCH_CHECK(std::isfinite(static_cast<float>(index.query_scale)), path,
              ": query_scale must be finite (in float32), got ", index.query_scale);
  const json orthonormal = header.value("orthonormal", json());
  index.orthonormal = orthonormal.is_boolean() ? orthonormal.get<bool>() : is_orthonormal(index.codebook);
  const json settings = header.value("settings", json::object());
  TORCH_CHECK(settings.is_object(), path, ": corrupted index file header (settings is not a JSON object)");
  index.settings = settings.dump();
  return index;
}

Index Index::to(const c10::Device& device) const {
  Index moved = *this;
  moved.codes = codes.to(device);
  moved.assign_weight = assign_weight.to(device);
  moved.codebook = codebook.to(device);
  return moved;
}

}  // namespace opqn_ext
