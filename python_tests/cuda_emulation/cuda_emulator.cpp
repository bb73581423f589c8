// The CUDA emulator's scheduler (cuda_emulator.h): ucontext fibers, one per thread of the block being
// run, switched only where a thread waits (a barrier or a warp collective) or ends, taken in the
// order of the schedule; guard pages and a SIGSEGV handler turn out-of-bounds accesses into launch
// errors, and a SIGILL handler the traps of undefined behaviour (the tests build the kernels with
// -fsanitize=undefined -fsanitize-undefined-trap-on-error).
#include "cuda_emulator.h"

#include <algorithm>
#include <csetjmp>
#include <csignal>
#include <iterator>
#include <cstdio>
#include <map>
#include <numeric>
#include <random>
#include <vector>

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

namespace opqn_emu {
namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kSharedLimit = 48 * 1024;          // without the opt-in
constexpr size_t kSharedOptInLimit = 227 * 1024;    // sm_90's largest block shared memory
constexpr int kWarpSize = 32;
constexpr uint64_t kMaxSweeps = 100000;  // rounds of a block's scheduler before it counts as endless

size_t page_bytes() { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }
size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

// A mapping whose last page is inaccessible; the usable bytes end right before it.
struct GuardedRegion {
  void* base = nullptr;
  size_t total = 0;
  char* guard = nullptr;  // first inaccessible byte
  std::string name;
};

std::vector<GuardedRegion*>& regions() {
  static std::vector<GuardedRegion*> all;
  return all;
}

GuardedRegion* map_guarded(size_t bytes, const std::string& name, bool guard_below) {
  const size_t page = page_bytes();
  auto* r = new GuardedRegion;
  r->total = round_up(bytes, page) + page * (guard_below ? 2 : 1);
  r->base = mmap(nullptr, r->total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (r->base == MAP_FAILED) {
    std::perror("mmap");
    std::abort();
  }
  char* base = static_cast<char*>(r->base);
  if (guard_below) mprotect(base, page, PROT_NONE);
  r->guard = base + r->total - page;
  mprotect(r->guard, page, PROT_NONE);
  r->name = name;
  regions().push_back(r);
  return r;
}

void unmap_guarded(GuardedRegion* r) {
  auto& all = regions();
  for (size_t i = 0; i < all.size(); ++i) {
    if (all[i] == r) {
      all.erase(all.begin() + static_cast<std::ptrdiff_t>(i));
      break;
    }
  }
  munmap(r->base, r->total);
  delete r;
}

// Usable bytes of a region, `alignment`-byte aligned, ending as close to the guard page as that allows.
void* data_start(const GuardedRegion* r, size_t bytes, size_t alignment = 8) {
  return r->guard - round_up(bytes, alignment);
}

// Dynamic shared memory starts 16-byte aligned, as on the device (vector loads rely on it).
constexpr size_t kDynamicSharedAlignment = 16;

struct Fiber {
  ucontext_t context;
  GuardedRegion* stack = nullptr;  // guard page below: an overflow faults
  dim3 index;
  int linear = 0;
  bool done = false;
};

struct BlockBarrier {
  int arrived = 0;
  uint64_t generation = 0;
  const char* file = nullptr;
  int line = 0;
};

struct WarpState {
  unsigned arrived = 0, mask = 0;
  uint64_t generation = 0;
  const char* file = nullptr;
  int line = 0;
  uint64_t values[kWarpSize] = {};
  int sources[kWarpSize] = {};
  uint64_t results[kWarpSize] = {};
};

struct SharedAllocation {
  GuardedRegion* region;
  size_t bytes;
};

struct Emulator {
  LaunchConfig config;
  const std::function<void()>* body = nullptr;
  std::vector<Fiber> fibers;
  Fiber* current = nullptr;
  ucontext_t scheduler;
  dim3 block;
  int done = 0;
  uint64_t progress = 0;
  BlockBarrier barrier;
  std::vector<WarpState> warps;
  std::map<int, SharedAllocation> shared;
  GuardedRegion* dynamic = nullptr;
  size_t static_shared_bytes = 0;
  std::string error;
  Schedule schedule = Schedule::kAscending;
  sigjmp_buf fault_return;
  bool running = false;
};

Emulator& emu() {
  static Emulator e;
  return e;
}

std::string where(const char* file, int line) { return std::string(file) + ":" + std::to_string(line); }

std::string index_name(const dim3& i) {
  return "(" + std::to_string(i.x) + "," + std::to_string(i.y) + "," + std::to_string(i.z) + ")";
}

std::string thread_name(const Fiber& f, const dim3& block) {
  return "thread " + index_name(f.index) + " of block " + index_name(block);
}

// Back to the scheduler; returns when this fiber is next run.
void yield() {
  Emulator& e = emu();
  swapcontext(&e.current->context, &e.scheduler);
}

// Records the launch's first error and never returns: the scheduler abandons the launch.
[[noreturn]] void fail(const std::string& message) {
  Emulator& e = emu();
  if (e.error.empty()) e.error = thread_name(*e.current, e.block) + ": " + message;
  for (;;) yield();
}

void fiber_main() {
  Emulator& e = emu();
  (*e.body)();
  Fiber& self = *e.current;
  self.done = true;
  ++e.done;
  ++e.progress;
  if (e.barrier.arrived > 0) {
    fail("exited while other threads of its block wait at __syncthreads (" +
         where(e.barrier.file, e.barrier.line) + ")");
  }
  const WarpState& w = e.warps[self.linear / kWarpSize];
  if (w.arrived != 0 && (w.mask >> (self.linear % kWarpSize) & 1u)) {
    fail("exited while its warp waits for it at a collective (" + where(w.file, w.line) + ")");
  }
  yield();  // never resumed
}

void release_block_shared() {
  Emulator& e = emu();
  for (auto& [id, allocation] : e.shared) unmap_guarded(allocation.region);
  e.shared.clear();
  if (e.dynamic != nullptr) unmap_guarded(e.dynamic);
  e.dynamic = nullptr;
  e.static_shared_bytes = 0;
}

std::string describe_waits() {
  Emulator& e = emu();
  std::string s;
  if (e.barrier.arrived > 0) {
    s += std::to_string(e.barrier.arrived) + " threads at __syncthreads (" +
         where(e.barrier.file, e.barrier.line) + ")";
  }
  for (size_t w = 0; w < e.warps.size(); ++w) {
    if (e.warps[w].arrived == 0) continue;
    s += (s.empty() ? "" : "; ") + std::string("warp ") + std::to_string(w) + " lanes " +
         std::to_string(__builtin_popcount(e.warps[w].arrived)) + " of mask at " +
         where(e.warps[w].file, e.warps[w].line);
  }
  return s;
}

std::string region_at(const void* address) {
  const char* a = static_cast<const char*>(address);
  for (const GuardedRegion* r : regions()) {
    const char* base = static_cast<const char*>(r->base);
    if (a >= base && a < base + r->total) {
      if (a >= r->guard) return "past the end of " + r->name;
      return "before the start of " + r->name;
    }
  }
  return "outside every emulated buffer";
}

constexpr int kFaultSignals[] = {SIGSEGV, SIGBUS, SIGILL, SIGFPE};

void on_fault(int signal_number, siginfo_t* info, void*) {
  Emulator& e = emu();
  if (!e.running) {
    signal(signal_number, SIG_DFL);
    return;
  }
  if (e.error.empty()) {
    char address[32];
    std::snprintf(address, sizeof address, "%p", info->si_addr);
    std::string what;
    if (signal_number == SIGILL) {
      what = std::string("undefined behaviour trapped (or an illegal instruction) at ") + address;
    } else if (signal_number == SIGFPE) {
      what = std::string("arithmetic fault (integer division by zero?) at ") + address;
    } else {
      what = std::string("invalid memory access at ") + address + ", " + region_at(info->si_addr);
    }
    e.error = (e.current != nullptr ? thread_name(*e.current, e.block) + ": " : std::string()) + what;
  }
  siglongjmp(e.fault_return, 1);
}

// Runs the current block to its end; false on an error.
bool run_block() {
  Emulator& e = emu();
  const dim3 b = e.config.block;
  const int n = static_cast<int>(b.x * b.y * b.z);
  e.done = 0;
  e.barrier = BlockBarrier{};
  e.warps.assign(static_cast<size_t>((n + kWarpSize - 1) / kWarpSize), WarpState{});
  // none given: the pointer is valid to form but any access faults, as on the device
  e.dynamic = map_guarded(e.config.dynamic_shared_bytes, "dynamic shared memory", false);
  std::memset(data_start(e.dynamic, e.config.dynamic_shared_bytes, kDynamicSharedAlignment), 0xFF,
              e.config.dynamic_shared_bytes);
  for (int i = 0; i < n; ++i) {
    Fiber& f = e.fibers[static_cast<size_t>(i)];
    f.linear = i;
    f.index = dim3(static_cast<unsigned>(i) % b.x, static_cast<unsigned>(i) / b.x % b.y,
                   static_cast<unsigned>(i) / (b.x * b.y));
    f.done = false;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = static_cast<char*>(f.stack->base) + page_bytes();
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = &e.scheduler;
    makecontext(&f.context, fiber_main, 0);
  }
  std::vector<int> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  if (e.schedule == Schedule::kDescending) std::reverse(order.begin(), order.end());
  std::mt19937 rng(e.block.x + 65536u * (e.block.y + 65536u * e.block.z));
  for (uint64_t sweep = 0; e.done < n; ++sweep) {
    if (sweep == kMaxSweeps) {
      e.error = "block " + index_name(e.block) + " has not ended after " + std::to_string(kMaxSweeps) +
                " rounds of synchronization: an endless loop?";
      return false;
    }
    const uint64_t before = e.progress;
    if (e.schedule == Schedule::kShuffled) std::shuffle(order.begin(), order.end(), rng);
    for (const int i : order) {
      Fiber& f = e.fibers[static_cast<size_t>(i)];
      if (f.done) continue;
      e.current = &f;
      swapcontext(&e.scheduler, &f.context);
      e.current = nullptr;
      if (!e.error.empty()) return false;
    }
    if (e.progress == before && e.done < n) {
      e.error = "deadlock in block " + index_name(e.block) + ": " + describe_waits();
      return false;
    }
  }
  const size_t limit = e.config.shared_opt_in ? kSharedOptInLimit : kSharedLimit;
  if (e.static_shared_bytes + e.config.dynamic_shared_bytes > limit) {
    e.error = "the block uses " + std::to_string(e.static_shared_bytes) + " bytes of static and " +
              std::to_string(e.config.dynamic_shared_bytes) + " of dynamic shared memory, over the limit of " +
              std::to_string(limit);
    return false;
  }
  return true;
}

}  // namespace

void set_schedule(Schedule schedule) { emu().schedule = schedule; }

const dim3& thread_index() { return emu().current->index; }
const dim3& block_index() { return emu().block; }
const dim3& block_dim() { return emu().config.block; }
const dim3& grid_dim() { return emu().config.grid; }

void sync_threads(const char* file, int line) {
  Emulator& e = emu();
  BlockBarrier& b = e.barrier;
  if (e.done > 0) fail("reached __syncthreads (" + where(file, line) + ") after threads of its block exited");
  if (b.arrived == 0) {
    b.file = file;
    b.line = line;
  } else if (b.line != line || std::strcmp(b.file, file) != 0) {
    fail("waits at __syncthreads " + where(file, line) + " while others wait at " + where(b.file, b.line));
  }
  ++e.progress;
  const int n = static_cast<int>(e.config.block.x * e.config.block.y * e.config.block.z);
  if (++b.arrived == n) {
    b.arrived = 0;
    ++b.generation;
    return;
  }
  const uint64_t generation = b.generation;
  while (b.generation == generation) yield();
}

uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, int lane_mask, const char* name,
                         const char* file, int line) {
  Emulator& e = emu();
  const int lane = e.current->linear % kWarpSize;
  WarpState& w = e.warps[static_cast<size_t>(e.current->linear / kWarpSize)];
  const std::string call = std::string(name) + " (" + where(file, line) + ")";
  if (!(mask >> lane & 1u)) fail("calls " + call + " with a mask without its lane");
  const int base = e.current->linear - lane;
  const int n = static_cast<int>(e.config.block.x * e.config.block.y * e.config.block.z);
  for (int l = 0; l < kWarpSize; ++l) {
    if ((mask >> l & 1u) && (base + l >= n || e.fibers[static_cast<size_t>(base + l)].done)) {
      fail(call + " names lane " + std::to_string(l) + ", which does not exist or has exited");
    }
  }
  const int source = lane ^ lane_mask;
  if (op == WarpOp::kShuffleXor && (source >= kWarpSize || !(mask >> source & 1u))) {
    fail(call + " reads lane " + std::to_string(source) + ", outside the mask");
  }
  if (w.arrived == 0) {
    w.mask = mask;
    w.file = file;
    w.line = line;
  } else if (w.mask != mask || w.line != line || std::strcmp(w.file, file) != 0) {
    fail(call + " meets its warp at " + where(w.file, w.line) + " with mask " + std::to_string(w.mask));
  }
  w.values[lane] = value;
  w.sources[lane] = source;
  w.arrived |= 1u << lane;
  ++e.progress;
  if (w.arrived == mask) {
    for (int l = 0; l < kWarpSize; ++l) {
      if (!(mask >> l & 1u)) continue;
      if (op == WarpOp::kShuffleXor) {
        w.results[l] = w.values[w.sources[l]];
      } else {
        unsigned peers = 0;
        for (int o = 0; o < kWarpSize; ++o) {
          if ((mask >> o & 1u) && w.values[o] == w.values[l]) peers |= 1u << o;
        }
        w.results[l] = peers;
      }
    }
    w.arrived = 0;
    ++w.generation;
    return w.results[lane];
  }
  const uint64_t generation = w.generation;
  while (w.generation == generation) yield();
  return w.results[lane];
}

void* shared_variable(int id, size_t bytes) {
  Emulator& e = emu();
  auto it = e.shared.find(id);
  if (it == e.shared.end()) {
    GuardedRegion* r = map_guarded(bytes, "a static shared variable", false);
    std::memset(data_start(r, bytes), 0xFF, bytes);
    it = e.shared.emplace(id, SharedAllocation{r, bytes}).first;
    e.static_shared_bytes += bytes;
  }
  return data_start(it->second.region, it->second.bytes);
}

void* dynamic_shared() {
  Emulator& e = emu();
  return data_start(e.dynamic, e.config.dynamic_shared_bytes, kDynamicSharedAlignment);
}

std::string run(const LaunchConfig& config, const std::function<void()>& body) {
  Emulator& e = emu();
  const size_t threads = static_cast<size_t>(config.block.x) * config.block.y * config.block.z;
  if (threads == 0 || threads > 1024) return "invalid block size " + std::to_string(threads);
  if (config.grid.x == 0 || config.grid.y == 0 || config.grid.z == 0) return "invalid grid (a zero dimension)";
  if (config.grid.y > 65535 || config.grid.z > 65535) return "grid y and z are limited to 65535";
  const size_t limit = config.shared_opt_in ? kSharedOptInLimit : kSharedLimit;
  if (config.dynamic_shared_bytes > limit) {
    return "dynamic shared memory of " + std::to_string(config.dynamic_shared_bytes) + " bytes over the limit of " +
           std::to_string(limit);
  }
  while (e.fibers.size() < threads) {
    e.fibers.emplace_back();
    e.fibers.back().stack = map_guarded(kStackBytes, "a thread's stack (overflow)", true);
  }
  e.config = config;
  e.body = &body;
  e.error.clear();
  e.progress = 0;
  static std::vector<char> signal_stack(64 * 1024);
  stack_t alternate{}, previous_stack{};
  alternate.ss_sp = signal_stack.data();
  alternate.ss_size = signal_stack.size();
  sigaltstack(&alternate, &previous_stack);
  struct sigaction action{}, previous[std::size(kFaultSignals)]{};
  action.sa_sigaction = on_fault;
  action.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
  for (size_t i = 0; i < std::size(kFaultSignals); ++i) sigaction(kFaultSignals[i], &action, &previous[i]);
  e.running = true;
  if (sigsetjmp(e.fault_return, 1) == 0) {
    for (unsigned z = 0; z < config.grid.z && e.error.empty(); ++z) {
      for (unsigned y = 0; y < config.grid.y && e.error.empty(); ++y) {
        for (unsigned x = 0; x < config.grid.x && e.error.empty(); ++x) {
          e.block = dim3(x, y, z);
          run_block();
          release_block_shared();
        }
      }
    }
  } else {
    release_block_shared();
  }
  e.running = false;
  e.current = nullptr;
  for (size_t i = 0; i < std::size(kFaultSignals); ++i) sigaction(kFaultSignals[i], &previous[i], nullptr);
  sigaltstack(&previous_stack, nullptr);
  return e.error;
}

DeviceBuffer::DeviceBuffer(const char* name, size_t bytes, const void* init)
    : bytes_(bytes) {
  GuardedRegion* r = map_guarded(bytes, name, true);
  region_ = r;
  data_ = data_start(r, bytes);
  if (init != nullptr) {
    std::memcpy(data_, init, bytes);
  } else {
    std::memset(data_, 0xFF, bytes);
  }
}

DeviceBuffer::~DeviceBuffer() { unmap_guarded(static_cast<GuardedRegion*>(region_)); }

void DeviceBuffer::copy_to(void* host) const { std::memcpy(host, data_, bytes_); }

}  // namespace opqn_emu
