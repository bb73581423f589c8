#include "index_format.h"

#include <algorithm>

#include <ATen/ops/bmm.h>
#include <ATen/ops/eye.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/nonzero.h>
#include <c10/util/Exception.h>
#include <zlib.h>

namespace opqn_ext::index_format {

uint32_t crc32_of(const at::Tensor& array) {
  constexpr int64_t kChunk = int64_t(1) << 30;  // zlib's crc32 takes at most 4 GiB a call
  const auto* bytes = static_cast<const Bytef*>(array.const_data_ptr());
  const int64_t n = array.nbytes();
  uLong crc = crc32(0L, Z_NULL, 0);
  for (int64_t start = 0; start < n; start += kChunk)
    crc = crc32(crc, bytes + start, static_cast<uInt>(std::min(kChunk, n - start)));
  return static_cast<uint32_t>(crc);
}

bool is_orthonormal(const at::Tensor& codebook) {
  const at::Tensor c = codebook.to(at::kDouble);
  const at::Tensor gram = at::bmm(c.transpose(1, 2), c);  // [M, K, K]
  return gram.sub(at::eye(codebook.size(2), gram.options())).abs().max().item<double>() <= 1e-4;
}

std::string list_of(const at::Tensor& values) {
  const at::Tensor shown = values.narrow(0, 0, std::min<int64_t>(values.size(0), 10)).cpu().contiguous();
  const int64_t* value = shown.const_data_ptr<int64_t>();
  std::string text = "[";
  for (int64_t i = 0; i < shown.size(0); ++i) text += (i ? ", " : "") + std::to_string(value[i]);
  text += "]";
  if (values.size(0) > 10) text += " and " + std::to_string(values.size(0) - 10) + " more";
  return text;
}

nlohmann::json settings_object(const std::string& settings) {
  nlohmann::json parsed;
  try {
    parsed = nlohmann::json::parse(settings);
  } catch (const nlohmann::json::parse_error&) {
  }
  TORCH_CHECK(parsed.is_object(), "settings must be the text of a JSON object, got ", settings);
  return parsed;
}

at::Tensor rows_not_finite(const at::Tensor& values) {
  return at::nonzero(at::isfinite(values).flatten(1).all(1).logical_not()).flatten();
}

}  // namespace opqn_ext::index_format
