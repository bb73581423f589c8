// The opqn_ext ops for C++ programs (libtorch, no Python): typed calls through the dispatcher, so
// they run the CPU or CUDA kernel of their arguments' device, under autocast as in Python. Link
// the library `opqn_ext_ops` (CMake: find_package(opqn_ext), target opqn_ext::opqn_ext_ops); loading
// it also registers the ops for TorchScript and AOTInductor models that call them. Bad arguments
// throw c10::Error naming the argument. Forward only: gradients are registered from Python.
#pragma once

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/core/Tensor.h>

// The library is built with hidden symbols; these are its interface.
#define OPQN_EXT_API __attribute__((visibility("default")))

namespace opqn_ext {

struct SoftQuantizeResult {
  at::Tensor probs;      // [B, M, K] soft-assignment probabilities (a query's ADC table)
  at::Tensor quantized;  // [B, M, d] soft-quantized sub-vectors codebook[m] @ probs[b, m]
  at::Tensor entropy;    // [B, M] entropy of each book's assignment
};

// x: [B, M*d] or [B, M, d]; assign_weight, codebook: [M, d, K] (DESIGN.md sections 1-2)
OPQN_EXT_API SoftQuantizeResult soft_quantize(const at::Tensor& x, const at::Tensor& assign_weight,
                                              const at::Tensor& codebook, double scale = 1.0, bool normalize = false);

// x: [B, M*d] or [B, M, d]; assign_weight: [M, d, K], K <= 256 -> codes [B, M] uint8, the argmax
// word of each book (ties to the smaller index)
OPQN_EXT_API at::Tensor encode(const at::Tensor& x, const at::Tensor& assign_weight, bool normalize = true);

// lut: [nq, M, K] float32; codes: [N, M] uint8; 1 <= k <= N -> (scores [nq, k] float32 descending,
// indices [nq, k] int64); score(i) = sum_m lut[q, m, codes[i, m]], ties to the smaller index
OPQN_EXT_API std::tuple<at::Tensor, at::Tensor> adc_topk(const at::Tensor& lut, const at::Tensor& codes, int64_t k);

// lut: [nq, M, K] float32; codes: [N, M] uint8 -> scores [nq, N] float32 (adc_topk's values)
OPQN_EXT_API at::Tensor adc_scores(const at::Tensor& lut, const at::Tensor& codes);

struct PackedCodes4 {
  at::Tensor data;  // [ceil(N/32), ceil(M/2), 32] uint8
  int64_t num_codes;  // N
};

// codes: [N, M] uint8, every value < 16 -> the 4-bit layout that adc_topk4 scans
OPQN_EXT_API PackedCodes4 pack_codes4(const at::Tensor& codes);

// lut: [nq, M, K <= 16] float32 -> the top-k by exact scores of the rerank * k best approximate
// (8-bit table) scores per query, as adc_topk returns them
OPQN_EXT_API std::tuple<at::Tensor, at::Tensor> adc_topk4(const at::Tensor& lut, const PackedCodes4& packed,
                                                          int64_t k, int64_t rerank = 2);

// The CPU instruction-set paths of the kernels that this machine runs ("scalar", "avx2", "avx512";
// best last); the one in use (the best, unless OPQN_CPU_ISA names one); set_cpu_isa forces one and
// throws c10::Error for an unknown name or a path this CPU lacks.
OPQN_EXT_API std::vector<std::string> available_cpu_isas();
OPQN_EXT_API std::string active_cpu_isa();
OPQN_EXT_API void set_cpu_isa(const std::string& name);

// Whether the library holds the CUDA kernels.
OPQN_EXT_API bool cuda_built();

}  // namespace opqn_ext
