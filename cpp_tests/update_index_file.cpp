// update_index_file SOURCE BATCHES OUTPUT RESULTS [DEVICE [map]]: the index of SOURCE (an index file,
// with "map" its per-item arrays mapped; or a torch.save file ending in .pt holding a model
// (assign_weight, codebook, query_scale, settings, orthonormal or None) for Index::create), on DEVICE
// (default cpu), takes each step of BATCHES (a torch.save file of a list of (values, ids or None,
// labels or None): float features for add, uint8 codes for add_codes, None to remove the ids; or
// ("merge", index file, id offset) for merge_from, ("reconstruct", ids, None)), is saved to
// OUTPUT, and what each step gave goes to RESULTS (readable by torch.load): the ids of an add or a
// merge, the vectors reconstructed; for a removal, contains(ids) and labels_of(ids) before it and
// the count removed. Then two
// copies of the index each add a row: each must keep its own; and a copy adds two rows: the second
// must go into the room the first made; and two threads save at once to one path: each save must
// succeed; and (K <= 16) fast-scan searches of a changing index must give those of its copies. An
// error goes to stderr as "error: <message>" with exit status 1.
#include <atomic>
#include <filesystem>
#include <iostream>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <ATen/ops/equal.h>
#include <ATen/ops/full.h>
#include <ATen/ops/rand.h>
#include <ATen/ops/randint.h>
#include <ATen/ops/tensor.h>
#include <opqn_ext/index.h>

#include "pickled_files.h"

namespace {

opqn_ext::Index source_index(const std::string& source, bool map) {
  if (!source.ends_with(".pt")) return opqn_ext::Index::load(source, true, map);
  const c10::IValue pickled = load_pickled(source.c_str());
  const auto& model = pickled.toTupleRef().elements();
  const std::optional<bool> orthonormal = model[4].isNone() ? std::nullopt : std::optional<bool>(model[4].toBool());
  return opqn_ext::Index::create(model[0].toTensor(), model[1].toTensor(), model[2].toDouble(),
                                 orthonormal, model[3].toStringRef());
}

at::Tensor optional_tensor(const c10::IValue& value) { return value.isNone() ? at::Tensor() : value.toTensor(); }

// Whether a copy of `index` that adds two rows in turn appends the second in place (the first makes
// room for more).
bool appends_in_place(const opqn_ext::Index& index) {
  opqn_ext::Index grown = index;
  const at::Tensor row = at::full({1, index.codes.size(1)}, 0, at::kByte);
  grown.add_codes(row);
  const void* codes_before = grown.codes.data_ptr();
  const void* ids_before = grown.ids.data_ptr();
  grown.add_codes(row);
  return grown.codes.data_ptr() == codes_before && grown.ids.data_ptr() == ids_before;
}

// Whether two copies of `index` that each add a row (0s to one, 1s to the other) keep their own rows.
bool copies_keep_their_rows(const opqn_ext::Index& index) {
  opqn_ext::Index zeros = index, ones = zeros;
  const int64_t M = index.codes.size(1);
  zeros.add_codes(at::full({1, M}, 0, at::kByte));
  ones.add_codes(at::full({1, M}, 1, at::kByte));
  const int64_t n = index.size();
  return zeros.size() == n + 1 && ones.size() == n + 1 && zeros.codes[n].eq(0).all().item<bool>() &&
         ones.codes[n].eq(1).all().item<bool>();
}

// Whether two threads saving `index` and a copy of it with one more row to `path`, 20 times each,
// all succeed and leave a whole file of one of them (each save has a temporary file of its own).
bool saves_at_once_succeed(const opqn_ext::Index& index, const std::string& path) {
  opqn_ext::Index larger = index;
  larger.add_codes(at::full({1, index.codes.size(1)}, 0, at::kByte));
  std::atomic<int> failed{0};
  auto save_often = [&](const opqn_ext::Index* which) {
    for (int i = 0; i < 20; ++i) {
      try {
        which->save(path);
      } catch (const c10::Error&) {
        ++failed;
      }
    }
  };
  std::thread first(save_often, &index), second(save_often, &larger);
  first.join();
  second.join();
  const int64_t size = opqn_ext::Index::load(path).size();
  std::filesystem::remove(path);
  return failed == 0 && (size == index.size() || size == larger.size());
}

// Whether fast-scan searches of a copy of `index` as it changes (rows appended a few at a time,
// rows sorted in, rows removed) each give what a copy of it then gives, which packs its codes anew:
// the 4-bit layout an index keeps and extends follows its codes. Every item's score is compared;
// last, two threads search at once.
bool packed_layout_follows_the_codes(const opqn_ext::Index& index) {
  const int64_t M = index.codes.size(1), K = index.codebook.size(2);
  opqn_ext::Index changing = index;
  const at::Tensor tables = at::rand({3, M, K}).to(index.codes.device());
  opqn_ext::SearchOptions fast;
  fast.fast_scan = true;
  auto agrees = [&] {
    if (changing.size() == 0) return true;
    const auto [scores, ids] = changing.search_luts(tables, changing.size(), fast);
    const opqn_ext::Index fresh = changing;
    const auto [fresh_scores, fresh_ids] = fresh.search_luts(tables, changing.size(), fast);
    return at::equal(scores, fresh_scores) && at::equal(ids, fresh_ids);
  };
  const at::Tensor rows = at::randint(0, K, {45, M}, at::kByte).to(index.codes.device());
  bool same = agrees();
  for (const int64_t step : {1, 7, 33, 4}) {
    changing.add_codes(rows.narrow(0, 0, step));
    same = agrees() && same;
  }
  const int64_t last = changing.ids[-1].item<int64_t>();
  changing.add_codes(rows.narrow(0, 0, 2), at::tensor({last + 9, last + 3}));  // not increasing: sorted in
  same = agrees() && same;
  changing.add_codes(rows.narrow(0, 0, 5));
  same = agrees() && same;
  changing.remove(changing.ids.narrow(0, 0, 3));
  same = agrees() && same;
  changing.add_codes(rows.narrow(0, 0, 6));
  same = agrees() && same;
  // two threads at once on a layout that is to be extended: one extends it, the other waits for it
  changing.add_codes(rows.narrow(0, 0, 3));
  const opqn_ext::Index fresh = changing;
  const at::Tensor want = std::get<1>(fresh.search_luts(tables, changing.size(), fast));
  std::atomic<int> differ{0};
  auto search = [&] { differ += !at::equal(std::get<1>(changing.search_luts(tables, changing.size(), fast)), want); };
  std::thread first(search), second(search);
  first.join();
  second.join();
  return differ == 0 && same;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 5 || argc > 7 || (argc == 7 && std::string(argv[6]) != "map")) {
    std::cerr << "usage: update_index_file SOURCE BATCHES OUTPUT RESULTS [DEVICE [map]]\n";
    return 2;
  }
  try {
    opqn_ext::Index index = source_index(argv[1], argc == 7).to(c10::Device(argc >= 6 ? argv[5] : "cpu"));
    const c10::IValue batches = load_pickled(argv[2]);
    std::vector<c10::IValue> given;
    for (const c10::IValue& batch : batches.toListRef()) {
      const auto parts = batch.toTupleRef().elements();
      if (parts[0].isString() && parts[0].toStringRef() == "merge") {
        given.emplace_back(index.merge_from(opqn_ext::Index::load(parts[1].toStringRef()), parts[2].toInt()));
        continue;
      }
      if (parts[0].isString() && parts[0].toStringRef() == "reconstruct") {
        given.emplace_back(index.reconstruct(parts[1].toTensor()).cpu());
        continue;
      }
      const at::Tensor values = optional_tensor(parts[0]), ids = optional_tensor(parts[1]);
      const at::Tensor labels = optional_tensor(parts[2]);
      if (!values.defined()) {
        given.emplace_back(index.contains(ids));
        given.emplace_back(index.labels_of(ids));
        given.emplace_back(at::full({1}, index.remove(ids), at::kLong));
      } else {
        given.emplace_back(values.scalar_type() == at::kByte ? index.add_codes(values, ids, labels)
                                                             : index.add(values, ids, labels));
      }
    }
    index.save(argv[3]);
    save_pickled(argv[4], given);
    if (index.codebook.size(2) >= 2 && !copies_keep_their_rows(index)) {
      std::cerr << "error: copies of an index share the rows they add\n";
      return 1;
    }
    if (!saves_at_once_succeed(index, std::string(argv[3]) + ".at-once")) {
      std::cerr << "error: saves from two threads to one path failed\n";
      return 1;
    }
    if (index.codebook.size(2) <= 16 && !packed_layout_follows_the_codes(index)) {
      std::cerr << "error: a fast-scan search of a changed index differs from that of its copy\n";
      return 1;
    }
    if (!appends_in_place(index)) {
      std::cerr << "error: an append moved the rows appended before it\n";
      return 1;
    }
    std::cout << "saved " << index.size() << " items\n";
  } catch (const c10::Error& e) {
    std::cerr << "error: " << e.what_without_backtrace() << "\n";
    return 1;
  }
  return 0;
}
