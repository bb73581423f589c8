// The portable 4-bit scanner: nibbles read one by one, the same integer sums as the AVX2 scanner.
#include "cpu/fastscan4.h"

namespace opqn::cpu::scalar {

void scan4(const uint8_t* tables, int64_t nq, const uint8_t* packed, int64_t pairs, int64_t num_codes,
           int64_t first_block, int64_t end_block, TopK* tops) {
  for (int64_t block = first_block; block < end_block; ++block) {
    const uint8_t* codes = packed + block * pairs * 32;
    for (int64_t q = 0; q < nq; ++q) {
      const uint8_t* table = tables + q * pairs * 32;
      TopK& top = tops[q];
      for (int64_t j = 0; j < kBlockCodes4; ++j) {
        const int64_t id = block * kBlockCodes4 + j;
        if (id >= num_codes) break;
        int32_t s = 0;
        for (int64_t p = 0; p < pairs; ++p) {
          for (int64_t half = 0; half < 2; ++half) {
            const uint8_t byte = codes[p * 32 + half * 16 + j % 16];
            const uint8_t word = j < 16 ? byte & 0x0F : byte >> 4;
            s += table[p * 32 + half * 16 + word];
          }
        }
        if (static_cast<float>(s) > top.threshold) topk_offer(top, static_cast<float>(s), id);
      }
    }
  }
}

}  // namespace opqn::cpu::scalar
