#include "cpu/radix_sort.h"

#include <algorithm>
#include <array>

#include <c10/util/Exception.h>

namespace opqn::cpu {

namespace {
constexpr int kDigitBits = 11;
constexpr uint64_t kDigitMask = (uint64_t(1) << kDigitBits) - 1;
constexpr int kMaxDigits = (64 + kDigitBits - 1) / kDigitBits;

template <int kDigits>
void radix_sort_digits(std::vector<uint64_t>& keys, std::vector<uint64_t>& scratch, int first_bit) {
  const size_t n = keys.size();
  std::array<std::array<uint32_t, kDigitMask + 1>, kDigits> counts;
  for (auto& digit_counts : counts) digit_counts.fill(0);
  for (uint64_t key : keys) {
    const uint64_t bits = key >> first_bit;
    for (int d = 0; d < kDigits; ++d) ++counts[d][(bits >> (d * kDigitBits)) & kDigitMask];
  }
  scratch.resize(n);
  for (int d = 0; d < kDigits; ++d) {
    auto& digit_counts = counts[d];
    // A digit shared by every key does not reorder anything.
    if (std::any_of(digit_counts.begin(), digit_counts.end(), [n](uint32_t c) { return c == n; }))
      continue;
    uint32_t offset = 0;
    for (auto& c : digit_counts) {
      const uint32_t here = c;
      c = offset;
      offset += here;
    }
    const int shift = first_bit + d * kDigitBits;
    for (uint64_t key : keys) scratch[digit_counts[(key >> shift) & kDigitMask]++] = key;
    keys.swap(scratch);
  }
}

}  // namespace

void radix_sort(std::vector<uint64_t>& keys, std::vector<uint64_t>& scratch, int first_bit) {
  if (first_bit == 32) return radix_sort_digits<(32 + kDigitBits - 1) / kDigitBits>(keys, scratch, 32);
  TORCH_INTERNAL_ASSERT(first_bit == 0, "radix_sort sorts by bits [0, 64) or [32, 64)");
  radix_sort_digits<kMaxDigits>(keys, scratch, 0);
}

}  // namespace opqn::cpu
