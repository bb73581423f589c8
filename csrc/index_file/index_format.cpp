#include "index_format.h"

#include <algorithm>
#include <vector>

#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/eye.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/nonzero.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/zeros_like.h>
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

at::Tensor append_rows(const at::Tensor& current, at::Tensor& room, const at::Tensor& rows) {
  const int64_t n = current.size(0), need = n + rows.size(0);
  const bool fits = room.defined() && room.device() == current.device() && need <= room.size(0) &&
                    (n == 0 || current.data_ptr() == room.data_ptr());
  if (!fits) {
    std::vector<int64_t> shape = current.sizes().vec();
    shape[0] = n == 0 ? need : std::max(need, n + n / 2);
    room = at::empty(shape, current.options());
    room.narrow(0, 0, n).copy_(current);
  }
  room.narrow(0, n, rows.size(0)).copy_(rows);
  return room.narrow(0, 0, need);
}

at::Tensor integer_ids(const at::Tensor& ids, const char* name) {
  TORCH_CHECK(ids.numel() == 0 || at::isIntegralType(ids.scalar_type(), false), name, " must be integers, got ",
              ids.scalar_type());
  return ids.to(at::kCPU, at::kLong).reshape(-1).contiguous();
}

std::pair<at::Tensor, at::Tensor> find(const at::Tensor& held, const at::Tensor& ids) {
  if (held.size(0) == 0) return {at::zeros_like(ids), at::zeros_like(ids, at::kBool)};
  const at::Tensor pos = at::searchsorted(held, ids).clamp_max(held.size(0) - 1);
  return {pos, held.index_select(0, pos).eq(ids)};
}

at::Tensor rows_not_finite(const at::Tensor& values) {
  return at::nonzero(at::isfinite(values).flatten(1).all(1).logical_not()).flatten();
}

}  // namespace opqn_ext::index_format
