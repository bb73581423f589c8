// Exact selection of the k largest keys held by the threads of one CUDA thread block: an MSB-first
// radix select over 64-bit rank keys (8 bits per pass, histogram in shared memory), then every
// thread writes its selected keys to the block's k output slots. Written once for the device and
// for a host emulation that runs each phase for every thread in turn, so that the CPU tests run the
// selection logic the GPU runs (python_tests/test_block_select.py).
//
// Rank keys: a code's score and its position in one uint64 whose unsigned order is (score
// ascending, then position descending), so the largest key is the best-ranked code and keys are
// distinct. Key 0 never comes from a position below 0xFFFFFFFF and stands for "no key".
#pragma once

#include <cstdint>

#if defined(OPQN_CUDA_EMULATION)
#include "cuda_emulator.h"
#endif

#if defined(__CUDACC__)
#define OPQN_HOST_DEVICE __host__ __device__
#define OPQN_UNROLL _Pragma("unroll")
#else
#define OPQN_HOST_DEVICE
#define OPQN_UNROLL
#endif

// The device path of the atomics and warp collectives below: on the GPU, and in the tests' CUDA
// emulator (cuda_utils.cuh); the host emulation of block_select_host.cpp takes the plain path.
#if defined(__CUDA_ARCH__) || defined(OPQN_CUDA_EMULATION)
#define OPQN_BLOCK_SELECT_DEVICE 1
#else
#define OPQN_BLOCK_SELECT_DEVICE 0
#endif

namespace opqn::cuda {

constexpr uint64_t kNoKey = 0;
constexpr uint32_t kMaxPosition = 0xFFFFFFFEu;  // positions 0..kMaxPosition have nonzero keys
constexpr uint64_t kSignBit = uint64_t(1) << 63;

// The bits of `from` as a To of the same size (std::bit_cast, on the host and the device).
template <class To, class From>
OPQN_HOST_DEVICE inline To bits_as(const From& from) {
  static_assert(sizeof(To) == sizeof(From));
  To to;
  __builtin_memcpy(&to, &from, sizeof(To));
  return to;
}

// The rank key of `score` at `position` (<= kMaxPosition); -0.0 ranks as +0.0, as float compares.
OPQN_HOST_DEVICE inline uint64_t rank_key(float score, uint32_t position) {
  const uint32_t u = bits_as<uint32_t>(score == 0.0f ? 0.0f : score);
  const uint32_t ordered = (u & 0x80000000u) ? ~u : (u | 0x80000000u);  // increasing with score
  return (static_cast<uint64_t>(ordered) << 32) | (0xFFFFFFFFu - position);
}

OPQN_HOST_DEVICE inline float key_score(uint64_t key) {
  const uint32_t ordered = static_cast<uint32_t>(key >> 32);
  return bits_as<float>((ordered & 0x80000000u) ? (ordered & 0x7FFFFFFFu) : ~ordered);
}

OPQN_HOST_DEVICE inline uint32_t key_position(uint64_t key) {
  return 0xFFFFFFFFu - static_cast<uint32_t>(key);
}

// int64 with the same order as the unsigned key (for at::topk); kNoKey becomes INT64_MIN.
OPQN_HOST_DEVICE inline int64_t signed_key(uint64_t key) { return static_cast<int64_t>(key ^ kSignBit); }
OPQN_HOST_DEVICE inline uint64_t unsigned_key(int64_t key) { return static_cast<uint64_t>(key) ^ kSignBit; }

OPQN_HOST_DEVICE inline uint32_t atomic_increment(uint32_t* counter) {
#if OPQN_BLOCK_SELECT_DEVICE
  return atomicAdd(counter, 1u);
#else
  return (*counter)++;
#endif
}

constexpr int kSelectBins = 256;
constexpr int kSelectLanes = 32;  // threads that scan the histogram
constexpr int kBinsPerLane = kSelectBins / kSelectLanes;
constexpr uint32_t kNoBin = kSelectBins;  // a key that the current pass does not count

// Adds 1 to hist[bin] unless bin is kNoBin. On the device every lane of the warp calls this
// together, and the lanes that share a bin add at once (one shared-memory atomic per distinct bin,
// not 32 serialized ones: a block's keys mostly share their top digits).
OPQN_HOST_DEVICE inline void count_in_bin(uint32_t* hist, uint32_t bin) {
#if OPQN_BLOCK_SELECT_DEVICE
  const unsigned peers = __match_any_sync(0xffffffffu, bin);
  if (bin != kNoBin && static_cast<int>(threadIdx.x % 32) == __ffs(peers) - 1) {
    atomicAdd(&hist[bin], static_cast<uint32_t>(__popc(peers)));
  }
#else
  if (bin != kNoBin) ++hist[bin];
#endif
}

// One pass's position in the select: the digits fixed so far, and the wanted rank among the keys
// that have them.
struct SelectStep {
  uint64_t prefix;  // the digits fixed so far
  uint32_t rank;    // wanted rank (1 = largest) among the keys matching prefix
  int32_t shift;    // the current digit is (key >> shift) & 0xFF
};

// Shared state of one block's selection. A pass reads step[cur] and writes step[cur ^ 1], so the
// lane that updates the step never races the lanes still reading it.
struct BlockSelect {
  uint32_t hist[kSelectBins];         // counts of the current digit among keys matching prefix
  uint32_t lane_total[kSelectLanes];  // lane l: bins 255 - 8l down to 248 - 8l
  SelectStep step[2];
  int32_t done;      // 1: the k largest are the keys with key >> shift >= prefix >> shift
  uint32_t written;  // output slots filled
};

// Keys above the current digit: mask of the digits already fixed.
OPQN_HOST_DEVICE inline uint64_t fixed_digits_mask(int shift) {
  return shift >= 56 ? uint64_t(0) : ~uint64_t(0) << (shift + 8);
}

// Selects the min(k, n_valid) largest of the block's keys and calls emit(slot, key) for slots
// 0..k-1: the selected keys in any order, then kNoKey for the slots left when n_valid < k.
// keys(tid, j) is key j < kItems of thread tid (kNoKey where it holds none); the block has
// n_valid keys in all. Block: each(f) runs f(tid) on every thread, sync() is a block barrier,
// threads() is the block size (a multiple of 32: whole warps).
template <int kItems, class Block, class Keys, class Emit>
OPQN_HOST_DEVICE void block_select_largest(const Block& block, BlockSelect& st, const Keys& keys,
                                           uint32_t n_valid, uint32_t k, const Emit& emit) {
  block.each([&](int tid) {
    for (int b = tid; b < kSelectBins; b += block.threads()) st.hist[b] = 0;
    if (tid == 0) {
      st.step[0] = SelectStep{0, k, n_valid <= k ? 0 : 56};
      st.done = n_valid <= k ? 1 : 0;
      st.written = 0;
    }
  });
  block.sync();
  int cur = 0;
  while (!st.done) {
    block.each([&](int tid) {
      const SelectStep s = st.step[cur];
      const uint64_t mask = fixed_digits_mask(s.shift);
OPQN_UNROLL
      for (int j = 0; j < kItems; ++j) {
        const uint64_t key = keys(tid, j);
        const bool counted = key != kNoKey && ((key ^ s.prefix) & mask) == 0;
        count_in_bin(st.hist, counted ? static_cast<uint32_t>((key >> s.shift) & 0xFF) : kNoBin);
      }
    });
    block.sync();
    block.each([&](int tid) {
      if (tid >= kSelectLanes) return;
      uint32_t total = 0;
      for (int i = 0; i < kBinsPerLane; ++i) total += st.hist[kSelectBins - 1 - tid * kBinsPerLane - i];
      st.lane_total[tid] = total;
    });
    block.sync();
    block.each([&](int tid) {
      if (tid >= kSelectLanes) return;
      const SelectStep s = st.step[cur];
      uint32_t before = 0;
      for (int l = 0; l < tid; ++l) before += st.lane_total[l];
      const int top_bin = kSelectBins - 1 - tid * kBinsPerLane;
      if (before < s.rank && s.rank <= before + st.lane_total[tid]) {  // exactly one lane
        for (int b = top_bin; b > top_bin - kBinsPerLane; --b) {
          const uint32_t count = st.hist[b];
          if (s.rank <= before + count) {
            const uint32_t rank = s.rank - before;
            const bool last = count == rank || s.shift == 0;
            st.step[cur ^ 1] = SelectStep{s.prefix | (static_cast<uint64_t>(b) << s.shift), rank,
                                          last ? s.shift : s.shift - 8};
            if (last) st.done = 1;
            break;
          }
          before += count;
        }
      }
      for (int b = top_bin; b > top_bin - kBinsPerLane; --b) st.hist[b] = 0;
    });
    block.sync();
    cur ^= 1;
  }
  block.each([&](int tid) {
    const SelectStep s = st.step[cur];
    const uint64_t threshold = s.prefix >> s.shift;
OPQN_UNROLL
    for (int j = 0; j < kItems; ++j) {
      const uint64_t key = keys(tid, j);
      if (key != kNoKey && (key >> s.shift) >= threshold) emit(atomic_increment(&st.written), key);
    }
  });
  block.sync();
  block.each([&](int tid) {
    for (uint32_t slot = st.written + tid; slot < k; slot += block.threads()) emit(slot, kNoKey);
  });
}

}  // namespace opqn::cuda
