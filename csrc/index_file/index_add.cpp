// opqn_ext/index.h: making an index, adding items to it, merging indexes and removing items in C++,
// as OPQNIndex's constructor, add, add_codes, merge_from, remove, contains, labels_of and
// reconstruct do in Python (opqn_ext/index.py), with the same checks.
#include <algorithm>
#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include <ATen/ops/arange.h>
#include <ATen/ops/argsort.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/equal.h>
#include <ATen/ops/full.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/nonzero.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/unique_dim.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

#include "index_format.h"
#include "opqn_ext/index.h"

namespace opqn_ext {
namespace {

using index_format::append_rows;
using index_format::find;
using index_format::integer_ids;

constexpr int64_t kEncodeBatch = 65536;  // rows encoded at a time (OPQNIndex.add's batch_size)

// `values` [n] of any integer dtype as int64 on the CPU; undefined: `otherwise`.
at::Tensor integers(const char* name, const at::Tensor& values, int64_t n, at::Tensor otherwise) {
  if (!values.defined()) return otherwise;
  TORCH_CHECK(values.dim() == 1 && values.size(0) == n &&
                  (n == 0 || (at::isIntegralType(values.scalar_type(), false))),
              name, " must be ", n, " integers, got ", values.scalar_type(), " ", values.sizes());
  return values.to(at::kCPU, at::kLong).contiguous();
}

bool increasing(const at::Tensor& ids) {  // ids [n] int64 on the CPU
  const int64_t* id = ids.const_data_ptr<int64_t>();
  return std::adjacent_find(id, id + ids.size(0), [](int64_t a, int64_t b) { return a >= b; }) ==
         id + ids.size(0);
}

}  // namespace

Index Index::create(const at::Tensor& assign_weight, const at::Tensor& codebook, double query_scale,
                    std::optional<bool> orthonormal, std::string settings) {
  TORCH_CHECK(assign_weight.dim() == 3 && assign_weight.sizes() == codebook.sizes(),
              "assign_weight and codebook must both be [M, d, K], got ", assign_weight.sizes(), " and ",
              codebook.sizes());
  TORCH_CHECK(assign_weight.device() == codebook.device(), "assign_weight and codebook must be on one device, got ",
              assign_weight.device(), " and ", codebook.device());
  TORCH_CHECK(assign_weight.size(2) <= 256, "codes are uint8, so K must be <= 256, got K=", assign_weight.size(2));
  Index index;
  index.assign_weight = assign_weight.detach().to(at::kFloat).contiguous();
  index.codebook = codebook.detach().to(at::kFloat).contiguous();
  index.query_scale = query_scale;
  TORCH_CHECK(at::isfinite(index.assign_weight).all().item<bool>(),
              "assign_weight must be finite (in float32): it holds NaN or infinite values");
  TORCH_CHECK(at::isfinite(index.codebook).all().item<bool>(),
              "codebook must be finite (in float32): it holds NaN or infinite values");
  TORCH_CHECK(std::isfinite(static_cast<float>(query_scale)), "query_scale must be finite (in float32), got ",
              query_scale);
  index_format::settings_object(settings);
  index.settings = std::move(settings);
  index.orthonormal = orthonormal.has_value() ? *orthonormal : index_format::is_orthonormal(index.codebook);
  const int64_t M = assign_weight.size(0);
  index.codes = at::zeros({0, M}, index.assign_weight.options().dtype(at::kByte));
  index.ids = at::zeros({0}, at::kLong);
  index.labels = at::zeros({0}, at::kLong);
  return index;
}

at::Tensor Index::add(const at::Tensor& features, const at::Tensor& ids, const at::Tensor& labels) {
  const int64_t M = assign_weight.size(0), D = M * assign_weight.size(1);
  TORCH_CHECK(features.dim() == 2 && features.size(1) == D, "features must be [B, ", D, "], got ",
              features.sizes());
  std::vector<at::Tensor> parts;
  for (int64_t start = 0; start < features.size(0); start += kEncodeBatch) {
    const at::Tensor batch = features.narrow(0, start, std::min(kEncodeBatch, features.size(0) - start));
    try {
      parts.push_back(encode(batch.to(assign_weight.device(), at::kFloat), assign_weight, true));
    } catch (const c10::Error&) {
      const at::Tensor bad = index_format::rows_not_finite(features);
      TORCH_CHECK(bad.size(0) == 0, "features must be finite: ", index_format::rows_of(bad),
                  " hold NaN or infinite values");
      throw;
    }
  }
  return add_codes(parts.empty() ? at::zeros({0, M}, codes.options()) : at::cat(parts), ids, labels);
}

at::Tensor Index::add_codes(const at::Tensor& new_codes, const at::Tensor& ids, const at::Tensor& labels) {
  const int64_t M = assign_weight.size(0), K = assign_weight.size(2);
  TORCH_CHECK(new_codes.dim() == 2 && new_codes.size(1) == M && new_codes.scalar_type() == at::kByte,
              "codes must be uint8 [B, ", M, "], got ", new_codes.scalar_type(), " ", new_codes.sizes());
  const int64_t n = new_codes.size(0), held = size();
  if (n > 0) {
    const int64_t largest = new_codes.max().item<int64_t>();
    TORCH_CHECK(largest < K, "codes must be < K=", K, ", got a code ", largest);
  }
  const int64_t last = held ? this->ids[held - 1].item<int64_t>() : kNoId;
  const int64_t first = std::max<int64_t>(last + 1, 0);
  const at::Tensor new_ids = integers("ids", ids, n, at::arange(first, first + n, at::kLong));
  TORCH_CHECK(!new_ids.eq(kNoId).any().item<bool>(), "ids must not hold ", kNoId,
              ": search returns that id where fewer than k items exist (as FAISS)");
  const at::Tensor new_labels = integers("labels", labels, n, at::full({n}, -1, at::kLong));
  const bool in_order = increasing(new_ids) && (n == 0 || new_ids[0].item<int64_t>() > last);
  if (!in_order) {
    TORCH_CHECK(std::get<0>(at::unique_dim(new_ids, 0)).size(0) == n, "ids must be unique: the batch repeats an id");
    const at::Tensor clash = find(this->ids, new_ids).second;
    TORCH_CHECK(!clash.any().item<bool>(), "ids already in the index: ",
                index_format::list_of(new_ids.masked_select(clash)));
  }
  insert(new_codes, new_ids, new_labels, in_order);
  return new_ids;
}

void Index::insert(const at::Tensor& new_codes, const at::Tensor& new_ids, const at::Tensor& new_labels,
                   bool in_order) {
  if (new_ids.size(0) == 0) return;
  // the three arrays change together or not at all (an allocation may fail)
  at::Tensor all_codes = append_rows(codes, room_.codes, new_codes.to(codes.device()));
  at::Tensor all_ids = append_rows(ids, room_.ids, new_ids);
  at::Tensor all_labels = append_rows(labels, room_.labels, new_labels);
  if (in_order) packed_follows(codes, all_codes);  // the packed layout still describes their first rows
  codes = std::move(all_codes);
  ids = std::move(all_ids);
  labels = std::move(all_labels);
  if (!in_order) {  // sorted by id: the scan's tie order (the smaller position first) is the smaller id's
    const at::Tensor order = at::argsort(ids, /*stable=*/true);
    ids = ids.index_select(0, order);
    labels = labels.index_select(0, order);
    codes = codes.index_select(0, order.to(codes.device()));
    room_ = AppendRoom();
  }
}

std::string Index::model_mismatch(const Index& other) const {
  const auto M = codes.size(1), d = codebook.size(1), K = codebook.size(2);
  const auto other_M = other.codes.size(1), other_d = other.codebook.size(1), other_K = other.codebook.size(2);
  if (other_M != M || other_d != d || other_K != K) {
    return c10::str("its codes are M=", other_M, " books of K=", other_K, " words (d=", other_d, "), not M=", M,
                    ", K=", K, " (d=", d, ")");
  }
  if (!at::equal(other.assign_weight.cpu(), assign_weight.cpu()))
    return "its assignment weights differ (another model made its codes)";
  if (!at::equal(other.codebook.cpu(), codebook.cpu())) return "its codebook differs (another model made its codes)";
  if (other.query_scale != query_scale || other.orthonormal != orthonormal)
    return "its query tables differ (query scale or codebook kind)";
  return "";
}

at::Tensor Index::merge_from(const Index& other, int64_t id_offset) {
  const std::string why = model_mismatch(other);
  TORCH_CHECK(why.empty(), "other cannot be merged: ", why);
  const at::Tensor new_ids = other.ids.add(id_offset);  // increasing, as every index's
  TORCH_CHECK(!new_ids.eq(kNoId).any().item<bool>(), "other's ids plus id_offset must not hold ", kNoId,
              ": search returns that id where fewer than k items exist (as FAISS)");
  const int64_t n = new_ids.size(0), held = size();
  const bool in_order = n == 0 || held == 0 || new_ids[0].item<int64_t>() > ids[held - 1].item<int64_t>();
  if (!in_order) {
    const at::Tensor clash = find(ids, new_ids).second;
    TORCH_CHECK(!clash.any().item<bool>(), "other holds ids this index holds already: ",
                index_format::list_of(new_ids.masked_select(clash)));
  }
  insert(other.codes, new_ids, other.labels, in_order);  // other's codes and labels are valid already
  return new_ids;
}

int64_t Index::remove(const at::Tensor& ids) {
  const auto [pos, found] = find(this->ids, integer_ids(ids));
  at::Tensor gone = at::zeros({size()}, at::kBool);
  gone.index_fill_(0, pos.masked_select(found), true);
  const int64_t removed = gone.sum().item<int64_t>();
  if (removed) {
    const at::Tensor keep = gone.logical_not();
    this->ids = this->ids.masked_select(keep);
    labels = labels.masked_select(keep);
    codes = codes.index_select(0, at::nonzero(keep).flatten().to(codes.device()));
    room_ = AppendRoom();
  }
  return removed;
}

at::Tensor Index::contains(const at::Tensor& ids) const {
  return find(this->ids, integer_ids(ids)).second.reshape(ids.sizes());
}

at::Tensor Index::reconstruct(const at::Tensor& wanted) const {
  const at::Tensor asked = integer_ids(wanted);
  const auto [pos, found] = find(ids, asked);
  TORCH_CHECK(found.all().item<bool>(), "ids not in the index: ",
              index_format::list_of(asked.masked_select(found.logical_not())));
  const at::Tensor rows = codes.index_select(0, pos.to(codes.device())).to(at::kLong);  // [n, M]
  std::vector<at::Tensor> words;  // per book [n, d]: the codewords of the items' codes
  for (int64_t m = 0; m < codes.size(1); ++m) words.push_back(codebook[m].t().index_select(0, rows.select(1, m)));
  return at::stack(words, 1).reshape({asked.size(0), -1});  // [n, M*d]
}

at::Tensor Index::labels_of(const at::Tensor& ids) const {
  const auto [pos, found] = find(this->ids, integer_ids(ids));
  const at::Tensor held = size() ? labels.index_select(0, pos) : pos;
  return held.masked_fill(found.logical_not(), -1).reshape(ids.sizes());
}

}  // namespace opqn_ext
