#include "cpu/radix_sort.h"

#include <algorithm>
#include <array>

#include <c10/util/Exception.h>

namespace opqn::cpu {

namespace {

// Below this many keys, 8-bit digits: their counts (1 KiB a digit) cost less to clear and scan
// than 11-bit ones (8 KiB), which take fewer passes over many keys.
constexpr size_t kWideDigitMinKeys = 4096;

template <int kDigitBits, int kDigits>
void radix_sort_digits(std::vector<uint64_t>& keys, std::vector<uint64_t>& scratch, int first_bit) {
  constexpr uint64_t kDigitMask = (uint64_t(1) << kDigitBits) - 1;
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

// Bits [first_bit, 64) in digits of kDigitBits.
template <int kDigitBits>
void radix_sort_from(std::vector<uint64_t>& keys, std::vector<uint64_t>& scratch, int first_bit) {
  if (first_bit == 32) return radix_sort_digits<kDigitBits, (32 + kDigitBits - 1) / kDigitBits>(keys, scratch, 32);
  radix_sort_digits<kDigitBits, (64 + kDigitBits - 1) / kDigitBits>(keys, scratch, 0);
}

}  // namespace

void radix_sort(std::vector<uint64_t>& keys, std::vector<uint64_t>& scratch, int first_bit) {
  TORCH_INTERNAL_ASSERT(first_bit == 0 || first_bit == 32, "radix_sort sorts by bits [0, 64) or [32, 64)");
  if (keys.size() < kWideDigitMinKeys) return radix_sort_from<8>(keys, scratch, first_bit);
  radix_sort_from<11>(keys, scratch, first_bit);
}

}  // namespace opqn::cpu
