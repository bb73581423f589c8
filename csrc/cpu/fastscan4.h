// 4-bit fast scan (K <= 16): codes packed for in-register table lookups, tables quantized to
// small integers, approximate scores accumulated in int16, the best candidates re-scored exactly.
//
// Packed layout, [blocks, pairs, 32] uint8 for N codes of M books: block b holds codes
// 32b..32b+31, pair p holds books 2p (bytes 0-15) and 2p+1 (bytes 16-31); in the half of book m,
// byte j holds code 32b+j in its low nibble and code 32b+16+j in its high nibble. Missing codes and
// books (N not a multiple of 32, M odd) are 0.
//
// One scanner per instruction set; all compute the same integer approximations, so they keep
// the same candidates and give identical results.
#pragma once

#include <cstdint>

#include "cpu/topk_heap.h"

namespace opqn::cpu {

constexpr int64_t kBlockCodes4 = 32;

// tables: [nq, pairs, 32] quantized tables, entry [pair, half * 16 + word] for book 2 pair + half;
// packed: [blocks, pairs, 32]; offers the approximate scores of the codes of blocks
// [first_block, end_block) (ids < num_codes only) of every query q to tops[q].
using Scan4Fn = void (*)(const uint8_t* tables, int64_t nq, const uint8_t* packed, int64_t pairs,
                         int64_t num_codes, int64_t first_block, int64_t end_block, TopK* tops);

namespace scalar {
void scan4(const uint8_t* tables, int64_t nq, const uint8_t* packed, int64_t pairs, int64_t num_codes,
           int64_t first_block, int64_t end_block, TopK* tops);
}
namespace avx2 {
void scan4(const uint8_t* tables, int64_t nq, const uint8_t* packed, int64_t pairs, int64_t num_codes,
           int64_t first_block, int64_t end_block, TopK* tops);
}
namespace avx512 {
void scan4(const uint8_t* tables, int64_t nq, const uint8_t* packed, int64_t pairs, int64_t num_codes,
           int64_t first_block, int64_t end_block, TopK* tops);
}

Scan4Fn scanner4();

}  // namespace opqn::cpu
