// Stable LSD radix sort of 64-bit keys, and the key that orders float scores from high to low.
// Used wherever a whole ranking is needed (long top-k lists, rank statistics): for tens of
// thousands of items it is several times faster than a comparison sort.
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

namespace opqn::cpu {

// 32 bits whose ascending order is the descending order of score; -0.0 and +0.0 give the same key.
inline uint32_t descending_score_key(float score) {
  score += 0.0f;
  uint32_t bits;
  std::memcpy(&bits, &score, sizeof(bits));
  const uint32_t ascending = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return ~ascending;
}

// The score a descending_score_key came from (+0.0 for a zero).
inline float score_of_descending_key(uint32_t key) {
  const uint32_t ascending = ~key;
  const uint32_t bits = (ascending & 0x80000000u) ? (ascending & 0x7fffffffu) : ~ascending;
  float score;
  std::memcpy(&score, &bits, sizeof(bits));
  return score;
}

// Sorts keys by their bits [first_bit, 64), stably, first_bit 0 or 32; scratch is resized to
// keys.size().
void radix_sort(std::vector<uint64_t>& keys, std::vector<uint64_t>& scratch, int first_bit);

}  // namespace opqn::cpu
