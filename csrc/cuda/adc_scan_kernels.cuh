// The CUDA kernels of adc_topk, adc_topk4 and adc_scores (host side: adc_scan_cuda.cu). Every
// kernel gives each query's padded table (256 entries per book for byte codes, 16 for 4-bit codes)
// to a block, in shared memory up to 48 KiB, and scores one code per thread per step, adding the
// table entries in book order as the CPU does, so scores are bit-identical to the CPU's exact
// scores. Codes are [N, M] uint8 rows (read as 32-bit words when M is a multiple of 4) or the 4-bit
// layout of pack_codes4, which is scored exactly (no table quantization: adc_topk4 on CUDA is an
// exact scan, its rerank has nothing to do).
// Top-k for k <= 1024: each block scores 4096 codes, keeps their rank keys (score and position,
// block_select.cuh) in registers and writes its k largest, found by a radix select in shared
// memory. Larger k: the dense kernel writes every code's rank key. Equal scores rank by smaller
// index on both paths.
#pragma once

#include <cstddef>
#include <cstdint>

#include "cuda/block_select.cuh"
#include "cuda/cuda_utils.cuh"

namespace opqn::cuda {

constexpr int64_t kMaxSharedLutEntries = 48 * 256;   // 48 KiB of table in shared memory
constexpr int kItemsPerThread = 16;
constexpr int64_t kBlockCodes = int64_t(kThreads) * kItemsPerThread;  // codes per select block
constexpr int64_t kMaxSelectK = 1024;

// Whether a table of `entries` floats goes to shared memory (else the kernels read it in global
// memory), and the dynamic shared memory that takes.
inline bool lut_in_shared(int64_t entries) { return entries <= kMaxSharedLutEntries; }
inline size_t lut_shared_bytes(int64_t entries) {
  return lut_in_shared(entries) ? static_cast<size_t>(entries) * sizeof(float) : 0;
}

// Grids over `count` codes for nq <= kMaxGridQueries queries (the grid's y limit): one code per
// thread (dense), kBlockCodes per block (select).
constexpr int64_t kMaxGridQueries = 65535;
inline dim3 dense_grid(int64_t count, int64_t nq) {
  return dim3(static_cast<unsigned>(ceil_div(count, kThreads)), static_cast<unsigned>(nq));
}
inline dim3 select_grid(int64_t count, int64_t nq) {
  return dim3(static_cast<unsigned>(ceil_div(count, kBlockCodes)), static_cast<unsigned>(nq));
}

// The thread block as block_select_largest sees it.
struct DeviceBlock {
  template <class F>
  __device__ void each(const F& f) const { f(static_cast<int>(threadIdx.x)); }
  __device__ void sync() const { __syncthreads(); }
  __device__ int threads() const { return kThreads; }
};

// The query's padded table lut [M, Codes::kLutStride]: copied to shared memory when kSharedLut
// (every thread of the block must call this), else read where it is.
template <bool kSharedLut>
__device__ __forceinline__ const float* stage_lut(const float* lut, int64_t entries, float* shared) {
  if constexpr (kSharedLut) {
    for (int64_t i = threadIdx.x; i < entries; i += kThreads) shared[i] = lut[i];
    __syncthreads();
    return shared;
  } else {
    return lut;
  }
}

// codes: [N, M] uint8 rows; kWords: 4-byte aligned and M a multiple of 4, read a word at a time.
template <bool kWords>
struct RowCodes {
  static constexpr int64_t kLutStride = 256;  // table entries per book: every byte value
  const uint8_t* codes;
  int64_t M;

  // sum_m lut[m, code[m]] of code i, in book order
  __device__ __forceinline__ float score(const float* lut, int64_t i) const {
    const uint8_t* code = codes + i * M;
    float s = 0.0f;
    if constexpr (kWords) {
      const uint32_t* words = reinterpret_cast<const uint32_t*>(code);
      for (int64_t w = 0; w < M / 4; ++w) {
        const uint32_t v = words[w];
        const float* l = lut + w * 4 * kLutStride;
        s += l[v & 0xFFu];
        s += l[kLutStride + ((v >> 8) & 0xFFu)];
        s += l[2 * kLutStride + ((v >> 16) & 0xFFu)];
        s += l[3 * kLutStride + (v >> 24)];
      }
    } else {
      for (int64_t m = 0; m < M; ++m) s += lut[m * kLutStride + code[m]];
    }
    return s;
  }
};

// packed: [blocks, (M + 1) / 2, 32], the layout of pack_codes4 (cpu/fastscan4.h): code 32b + j,
// book m in the low (j < 16) or high nibble of byte (b * pairs + m / 2) * 32 + (m % 2) * 16 + j % 16.
struct PackedCodes4 {
  static constexpr int64_t kLutStride = 16;  // table entries per book: every nibble value
  const uint8_t* packed;
  int64_t M, pairs;

  __device__ __forceinline__ float score(const float* lut, int64_t i) const {
    const uint8_t* bytes = packed + (i / 32) * pairs * 32 + i % 16;
    const int shift = (i % 32) < 16 ? 0 : 4;
    float s = 0.0f;
    for (int64_t m = 0; m < M; ++m) {
      s += lut[m * kLutStride + ((bytes[(m / 2) * 32 + (m % 2) * 16] >> shift) & 0x0F)];
    }
    return s;
  }
};

// luts: [nq, M, Codes::kLutStride] -> for codes [first, first + count): scores [nq, count] and
// signed rank keys [nq, count] (each unless null)
template <bool kSharedLut, class Codes>
__global__ void __launch_bounds__(kThreads)
adc_dense_kernel(const float* __restrict__ luts, Codes codes, int64_t M, int64_t first, int64_t count,
                 float* __restrict__ scores, int64_t* __restrict__ keys) {
  OPQN_DYNAMIC_SHARED(float, lut_shared);  // [M, Codes::kLutStride] when kSharedLut
  const int64_t q = blockIdx.y;
  const int64_t entries = M * Codes::kLutStride;
  const float* lut = stage_lut<kSharedLut>(luts + q * entries, entries, lut_shared);
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= count) return;
  const float s = codes.score(lut, first + i);
  if (scores != nullptr) scores[q * count + i] = s;
  if (keys != nullptr) keys[q * count + i] = signed_key(rank_key(s, static_cast<uint32_t>(i)));
}

// luts: [nq, M, Codes::kLutStride] -> candidates: [nq, gridDim.x, k], the signed rank keys of the
// k best of each block's kBlockCodes codes of [first, first + count) (INT64_MIN in slots a block
// has no code for)
template <bool kSharedLut, class Codes>
__global__ void __launch_bounds__(kThreads)
adc_select_kernel(const float* __restrict__ luts, Codes codes, int64_t M, int64_t first, int64_t count,
                  uint32_t k, int64_t* __restrict__ candidates) {
  OPQN_DYNAMIC_SHARED(float, lut_shared);  // [M, Codes::kLutStride] when kSharedLut
  OPQN_SHARED(BlockSelect, select);
  const int64_t q = blockIdx.y;
  const int64_t entries = M * Codes::kLutStride;
  const float* lut = stage_lut<kSharedLut>(luts + q * entries, entries, lut_shared);
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kBlockCodes;
  uint64_t keys[kItemsPerThread];
#pragma unroll
  for (int j = 0; j < kItemsPerThread; ++j) {
    const int64_t i = base + j * kThreads + threadIdx.x;
    keys[j] = i < count ? rank_key(codes.score(lut, first + i), static_cast<uint32_t>(i)) : kNoKey;
  }
  const auto n_valid = static_cast<uint32_t>(count - base < kBlockCodes ? count - base : kBlockCodes);
  int64_t* out = candidates + (q * gridDim.x + blockIdx.x) * k;
  block_select_largest<kItemsPerThread>(
      DeviceBlock{}, select, [&](int, int j) { return keys[j]; }, n_valid, k,
      [&](uint32_t slot, uint64_t key) { out[slot] = signed_key(key); });
}

// top: [n] signed rank keys of codes from `first` on -> scores [n], indices [n] (a template, as
// every kernel here, so that several translation units can include this header)
template <typename index_t>
__global__ void __launch_bounds__(kThreads)
decode_keys_kernel(const int64_t* __restrict__ top, int64_t n, int64_t first, float* __restrict__ scores,
                   index_t* __restrict__ indices) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= n) return;
  const uint64_t key = unsigned_key(top[i]);
  scores[i] = key_score(key);
  indices[i] = first + key_position(key);
}

}  // namespace opqn::cuda
