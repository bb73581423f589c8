// opqn_ext/index.h: Index::save, the file OPQNIndex.save writes (opqn_ext/index.py): a safetensors
// file (8 bytes of little-endian header length, the JSON header padded with spaces to 8 bytes, the
// arrays) whose metadata entry "opqn_index" holds our header with each array's CRC-32. Written to a
// temporary file next to the target, flushed, given the replaced file's permissions and renamed
// over it; then the folder is flushed.
#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>

#include "index_format.h"
#include "opqn_ext/index.h"

namespace opqn_ext {
namespace {

using nlohmann::json;

// A file descriptor closed (and its temporary file removed unless kept) when it goes out of scope.
struct TemporaryFile {
  std::string path;
  int fd = -1;
  bool keep = false;
  ~TemporaryFile() {
    if (fd >= 0) ::close(fd);
    if (!keep) ::unlink(path.c_str());
  }
};

[[noreturn]] void fail(const std::string& path, const char* doing) {
  C10_THROW_ERROR(Error, c10::str(path, ": cannot ", doing, " (", std::strerror(errno), ")"));
}

void write_all(const TemporaryFile& file, const void* data, int64_t bytes, const std::string& path) {
  constexpr int64_t kMostPerCall = int64_t(1) << 30;
  const char* at = static_cast<const char*>(data);
  while (bytes > 0) {
    const ssize_t written = ::write(file.fd, at, static_cast<size_t>(std::min(bytes, kMostPerCall)));
    if (written < 0 && errno == EINTR) continue;
    if (written <= 0) fail(path, "write the index file");
    at += written;
    bytes -= written;
  }
}

}  // namespace

void Index::save(const std::string& path) const {
  using index_format::kArrays;
  std::vector<at::Tensor> arrays;  // in kArrays' order, on the CPU
  json layout = json::object(), crcs = json::object();
  int64_t offset = 0;
  for (const index_format::ArraySpec& spec : kArrays) {
    const at::Tensor array = index_format::array_of(*this, spec.name).to(at::kCPU, spec.type).contiguous();
    layout[spec.name] = {{"dtype", spec.dtype}, {"shape", array.sizes().vec()},
                         {"data_offsets", {offset, offset + static_cast<int64_t>(array.nbytes())}}};
    crcs[spec.name] = index_format::crc32_of(array);
    offset += static_cast<int64_t>(array.nbytes());
    arrays.push_back(array);
  }
  const json model_settings = index_format::settings_object(settings);
  const json header = {{"format", index_format::kFormat},     {"format_version", index_format::kFormatVersion},
                       {"num_items", size()},                 {"num_books", codebook.size(0)},
                       {"dim", codebook.size(1)},             {"num_words", codebook.size(2)},
                       {"query_scale", query_scale},          {"orthonormal", orthonormal},
                       {"settings", model_settings},          {"crc32", crcs}};
  layout["__metadata__"] = {{index_format::kMetadataKey, header.dump()}};
  std::string text = layout.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // the arrays start 8-byte aligned
  const uint64_t header_len = text.size();

  const std::filesystem::path target(path);
  const std::filesystem::path folder = target.has_parent_path() ? target.parent_path() : ".";
  static std::atomic<uint64_t> saves{0};  // a temporary file per save: threads saving to one path never share one
  TemporaryFile tmp{(folder / ("." + target.filename().string() + ".tmp-" + std::to_string(::getpid()) + "-" +
                               std::to_string(saves++)))
                        .string()};
  tmp.fd = ::open(tmp.path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);  // a new file's mode
  if (tmp.fd < 0) fail(tmp.path, "create the index file");
  write_all(tmp, &header_len, 8, tmp.path);
  write_all(tmp, text.data(), static_cast<int64_t>(text.size()), tmp.path);
  for (const at::Tensor& array : arrays)
    write_all(tmp, array.const_data_ptr(), static_cast<int64_t>(array.nbytes()), tmp.path);
  struct stat replaced{};
  if (::stat(path.c_str(), &replaced) == 0 && ::fchmod(tmp.fd, replaced.st_mode & 07777) != 0)
    fail(tmp.path, "set the index file's permissions");
  if (::fsync(tmp.fd) != 0) fail(tmp.path, "flush the index file");
  if (::rename(tmp.path.c_str(), path.c_str()) != 0) fail(path, "replace the index file");
  tmp.keep = true;
  const int dir = ::open(folder.c_str(), O_RDONLY | O_CLOEXEC);
  if (dir < 0) fail(folder.string(), "open the index file's folder");
  const int flushed = ::fsync(dir);
  ::close(dir);
  if (flushed != 0) fail(folder.string(), "flush the index file's folder");
}

}  // namespace opqn_ext
