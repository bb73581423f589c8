// pack_codes4 for every device: the packed layout of cpu/fastscan4.h built from ATen ops.
#include <ATen/core/Tensor.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "checks.h"

namespace opqn {
namespace {

at::Tensor pack_codes4(const at::Tensor& codes) {
  check_defined(codes, "codes");
  check_rank(codes, 2, "codes", "[N, M]");
  TORCH_CHECK(codes.scalar_type() == at::kByte, "codes must be uint8, got ", codes.scalar_type());
  const int64_t N = codes.size(0), M = codes.size(1);
  TORCH_CHECK(M >= 1, "codes must have at least one book, got shape ", codes.sizes());
  TORCH_CHECK(codes.numel() == 0 || codes.max().item<uint8_t>() < 16,
              "codes must all be < 16 to pack into 4 bits, got a code of ", codes.numel() ? codes.max().item<int>() : 0);
  const int64_t blocks = (N + 31) / 32, pairs = (M + 1) / 2;
  // an empty [0, M] pads to nothing: torch 2.6 refuses to pad a dimension of size 0 at all
  if (N == 0) return at::empty({0, pairs, 32}, codes.options());
  // [N, M] -> [blocks * 32, pairs * 2], zero padded
  const at::Tensor padded = at::constant_pad_nd(codes, {0, pairs * 2 - M, 0, blocks * 32 - N}, 0);
  // [block, half of the block (low/high nibble), j, pair, book parity] -> [block, pair, parity, j, half]
  const at::Tensor parts = padded.view({blocks, 2, 16, pairs, 2}).permute({0, 3, 4, 2, 1});
  const at::Tensor low = parts.select(4, 0), high = parts.select(4, 1);
  return low.bitwise_or(high.bitwise_left_shift(4)).contiguous().view({blocks, pairs, 32});
}

}  // namespace

TORCH_LIBRARY_IMPL(opqn_ext, CompositeExplicitAutograd, m) { m.impl("pack_codes4", &pack_codes4); }

}  // namespace opqn
