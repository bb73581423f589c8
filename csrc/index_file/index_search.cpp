// opqn_ext/index.h: searching an index in C++ as OPQNIndex.search, search_luts, range_search and
// restricted do in Python (opqn_ext/index.py), with the same kernels, checks and results: top-k
// of every item or of a subset, over the 8-bit codes or their 4-bit layout, and range search.
#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include <ATen/ops/_unique.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/bincount.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/nonzero.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/take.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include "index_format.h"
#include "opqn_ext/index.h"

namespace opqn_ext {
namespace {

using namespace index_format;

// OPQNIndex.range_search's schedule: a first top-k, its growth and the largest top-k before every
// score is computed.
constexpr int64_t kRangeFirstK = 64, kRangeGrowth = 16, kRangeMaxK = 1024;

// An error naming the queries whose tables [nq, M, K] hold NaN or infinities, if any: the scan
// makes the check itself, so it is looked for only where there is no scan or the scan refused them.
void check_finite_tables(const at::Tensor& tables) {
  const at::Tensor bad = rows_not_finite(tables);
  TORCH_CHECK(bad.size(0) == 0, "queries ", rows_of(bad),
              " give tables that are not finite: NaN or infinite features, or values so large that a sub-vector's "
              "products with the weights or its squared norm overflow float32");
}

// Results [nq, n] (n <= k) widened to [nq, k] with score -inf and id kNoId.
std::tuple<at::Tensor, at::Tensor> padded(const at::Tensor& scores, const at::Tensor& ids, int64_t k) {
  const int64_t nq = scores.size(0), n = scores.size(1);
  if (n == k) return {scores, ids};
  return {at::cat({scores, at::full({nq, k - n}, -std::numeric_limits<float>::infinity(), at::kFloat)}, 1),
          at::cat({ids, at::full({nq, k - n}, kNoId, at::kLong)}, 1)};
}

// Range results (query, scores, ids: [n] each, on the CPU), each query's found in increasing id
// order where scores tie (top-k scans and scans of positions give them so), by query, then score
// descending, then smaller id: stable sorts by score, then query.
RangeResult ranges(int64_t nq, const at::Tensor& query, const at::Tensor& scores, const at::Tensor& ids) {
  at::Tensor order = std::get<1>(at::sort(scores, /*stable=*/true, 0, /*descending=*/true));
  order = order.index_select(0, std::get<1>(at::sort(query.index_select(0, order), true, 0, false)));
  at::Tensor lims = at::zeros({nq + 1}, at::kLong);
  lims.narrow(0, 1, nq).copy_(at::cumsum(at::bincount(query, {}, nq), 0));
  return {lims, scores.index_select(0, order), ids.index_select(0, order)};
}

// The index a scan of `subset` reads: the whole index where subset is undefined, otherwise its
// restriction to the subset, kept alive in `part`.
const Index& scanned_part(const Index& index, const at::Tensor& subset, std::optional<Index>& part) {
  if (subset.defined()) part = index.restricted(subset);
  return part ? *part : index;
}

at::Tensor cat_or_empty(const std::vector<at::Tensor>& parts, at::ScalarType dtype) {
  return parts.empty() ? at::empty({0}, dtype) : at::cat(parts);
}

}  // namespace

at::Tensor Index::query_lut(const at::Tensor& features) const {
  const int64_t M = codes.size(1), D = M * codebook.size(1);
  TORCH_CHECK(features.dim() == 2 && features.size(1) == D, "queries must be [nq, ", D, "], got ", features.sizes());
  const at::Tensor queries = features.to(codebook.device(), at::kFloat);
  const SoftQuantizeResult sq = soft_quantize(queries, assign_weight, codebook, query_scale, true);
  if (orthonormal) return sq.probs;
  return at::bmm(sq.quantized.transpose(0, 1), codebook).transpose(0, 1).contiguous();  // [nq, M, K]
}

Index Index::restricted(const at::Tensor& wanted) const {
  const at::Tensor unique = std::get<0>(at::_unique(integer_ids(wanted, "subset"), /*sorted=*/true));
  const auto [pos, found] = find(ids, unique);
  const at::Tensor kept = pos.masked_select(found);  // increasing, as the ids: the tie order stays the id order
  Index part = *this;
  part.codes = codes.index_select(0, kept.to(codes.device()));
  part.ids = ids.index_select(0, kept);
  part.labels = labels.index_select(0, kept);
  return part;
}

void Index::packed_follows(const at::Tensor& before, const at::Tensor& after) {
  std::lock_guard<std::mutex> lock(packed_.mutex);
  PackedCache::Layout& layout = packed_.layout;
  if (layout.packed && layout.source_data == before.const_data_ptr() &&
      layout.source.lock().get() == before.storage().unsafeGetStorageImpl()) {
    layout.source = after.storage().getWeakStorageImpl();
    layout.source_data = after.const_data_ptr();
  }
}

std::shared_ptr<const PackedCodes4> Index::packed_codes() const {
  std::lock_guard<std::mutex> lock(packed_.mutex);
  PackedCache::Layout& layout = packed_.layout;
  const int64_t n = size();
  const bool grown = layout.packed && layout.source_data == codes.const_data_ptr() &&
                     layout.source.lock().get() == codes.storage().unsafeGetStorageImpl() &&
                     layout.packed->num_codes <= n;
  if (grown && layout.packed->num_codes == n) return layout.packed;
  at::Tensor kept;  // [whole blocks, ceil(M/2), 32]: the part of the layout that stays as it is
  if (grown) {
    kept = layout.packed->data.narrow(0, 0, layout.packed->num_codes / 32);
  } else {
    kept = at::empty({0, (codes.size(1) + 1) / 2, 32}, codes.options());
    layout.room = at::Tensor();
  }
  const PackedCodes4 tail = pack_codes4(codes.narrow(0, kept.size(0) * 32, n - kept.size(0) * 32));
  const at::Tensor data = append_rows(kept, layout.room, tail.data);
  layout.packed = std::make_shared<const PackedCodes4>(PackedCodes4{data, n});
  layout.source = codes.storage().getWeakStorageImpl();
  layout.source_data = codes.const_data_ptr();
  return layout.packed;
}

std::tuple<at::Tensor, at::Tensor> Index::scan(const at::Tensor& queries, bool features, int64_t k,
                                               const SearchOptions& options) const {
  const int64_t M = codes.size(1), K = codebook.size(2);
  TORCH_CHECK(k >= 1, "k must be >= 1, got ", k);
  TORCH_CHECK(!options.fast_scan || K <= 16, "fast_scan needs K <= 16 codes; this index has K=", K);
  TORCH_CHECK(options.batch_size >= 1, "batch_size must be >= 1, got ", options.batch_size);
  if (features) {
    const int64_t D = M * codebook.size(1);
    TORCH_CHECK(queries.dim() == 2 && queries.size(1) == D, "queries must be [nq, ", D, "], got ", queries.sizes());
  } else {
    TORCH_CHECK(queries.dim() == 3 && queries.size(1) == M && queries.size(2) == K, "luts must be [nq, ", M, ", ", K,
                "], got ", queries.sizes());
  }
  std::optional<Index> part;
  const Index& scanned = scanned_part(*this, options.subset, part);
  const int64_t nq = queries.size(0), found = std::min(k, scanned.size());
  const std::shared_ptr<const PackedCodes4> packed =
      options.fast_scan && found && nq ? scanned.packed_codes() : nullptr;
  std::vector<at::Tensor> scores, ids;
  for (int64_t q0 = 0; q0 < nq; q0 += options.batch_size) {
    const at::Tensor batch = queries.narrow(0, q0, std::min(options.batch_size, nq - q0));
    const at::Tensor tables = features ? query_lut(batch) : batch.to(codes.device(), at::kFloat);  // [b, M, K]
    if (found == 0) {
      if (features) check_finite_tables(tables);  // nothing to scan: the tables are only checked
      scores.push_back(at::empty({tables.size(0), 0}, at::kFloat));
      ids.push_back(at::empty({tables.size(0), 0}, at::kLong));
      continue;
    }
    try {
      auto [top, pos] = packed ? adc_topk4(tables, *packed, found, options.rerank)
                               : adc_topk(tables, scanned.codes, found);
      scores.push_back(top.cpu());
      ids.push_back(at::take(scanned.ids, pos.cpu()));  // [b, found]
    } catch (const c10::Error&) {
      if (features) check_finite_tables(tables);  // the scan refuses such tables: this names the queries
      throw;
    }
  }
  if (scores.empty()) return {at::empty({0, k}, at::kFloat), at::empty({0, k}, at::kLong)};
  return padded(scores.size() == 1 ? scores[0] : at::cat(scores), ids.size() == 1 ? ids[0] : at::cat(ids), k);
}

std::tuple<at::Tensor, at::Tensor> Index::search(const at::Tensor& features, int64_t k,
                                                 const SearchOptions& options) const {
  return scan(features, true, k, options);
}

std::tuple<at::Tensor, at::Tensor> Index::search_luts(const at::Tensor& luts, int64_t k,
                                                      const SearchOptions& options) const {
  return scan(luts, false, k, options);
}

RangeResult Index::range_search(const at::Tensor& features, double min_score, const at::Tensor& subset,
                                int64_t batch_bytes) const {
  TORCH_CHECK(!std::isnan(min_score), "min_score must be a number, got nan");
  TORCH_CHECK(batch_bytes >= 1, "batch_bytes must be >= 1, got ", batch_bytes);
  const at::Tensor luts = query_lut(features);  // [nq, M, K]
  std::optional<Index> part;
  const Index& scanned = scanned_part(*this, subset, part);
  const int64_t nq = luts.size(0), n = scanned.size();
  const c10::Device device = codes.device();
  std::vector<at::Tensor> found_q, found_pos, found_scores;
  at::Tensor pending = at::arange(nq, at::kLong);
  for (int64_t k = std::min(n, kRangeFirstK); pending.size(0) && k;) {
    try {
      auto [top, pos] = adc_topk(luts.index_select(0, pending.to(device)), scanned.codes, k);  // [p, k]
      top = top.cpu();
      // every item above the threshold is in the top-k
      const at::Tensor complete =
          k == n ? at::full({pending.size(0)}, true, at::kBool) : top.select(1, k - 1).lt(min_score);
      const at::Tensor hit = complete.unsqueeze(1).logical_and(top.ge(min_score));  // [p, k]
      found_q.push_back(pending.unsqueeze(1).expand(hit.sizes()).masked_select(hit));  // row-major, as the others
      found_pos.push_back(pos.cpu().masked_select(hit));
      found_scores.push_back(top.masked_select(hit));
      pending = pending.masked_select(complete.logical_not());
    } catch (const c10::Error&) {
      check_finite_tables(luts);
      throw;
    }
    if (k >= std::min(n, kRangeMaxK)) break;
    k = std::min({n, kRangeMaxK, k * kRangeGrowth});
  }
  const int64_t rows = std::max<int64_t>(1, std::min<int64_t>(pending.size(0), 256));
  const int64_t cols = std::max<int64_t>(1, std::min<int64_t>(std::max<int64_t>(n, 1), batch_bytes / (4 * rows)));
  for (int64_t q0 = 0; q0 < pending.size(0); q0 += rows) {
    const at::Tensor block = pending.narrow(0, q0, std::min(rows, pending.size(0) - q0));
    const at::Tensor tables = luts.index_select(0, block.to(device));
    for (int64_t i0 = 0; i0 < n; i0 += cols) {
      const at::Tensor scores = adc_scores(tables, scanned.codes.narrow(0, i0, std::min(cols, n - i0)));
      const at::Tensor where = at::nonzero(scores.ge(min_score));  // [hits, 2]: (row, column), row-major
      const at::Tensor row = where.select(1, 0), column = where.select(1, 1);
      // a gather of the hits (masked_select takes several times longer on the CPU)
      found_scores.push_back(scores.flatten().index_select(0, row.mul(scores.size(1)).add_(column)).cpu());
      found_q.push_back(block.index_select(0, row.cpu()));
      found_pos.push_back(column.cpu().add(i0));
    }
  }
  const at::Tensor pos = cat_or_empty(found_pos, at::kLong);
  return ranges(nq, cat_or_empty(found_q, at::kLong), cat_or_empty(found_scores, at::kFloat),
                scanned.ids.index_select(0, pos));
}

}  // namespace opqn_ext
