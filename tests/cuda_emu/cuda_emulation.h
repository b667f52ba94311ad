// A host emulator for the CUDA kernels in csrc/cuda, so that their indexing,
// tiling, shared-memory pipeline and epilogues are tested on machines without
// a GPU. Each CUDA thread of a block runs as a host thread; blocks run one
// after another (so __shared__ can be a function-local static). Emulated:
// __syncthreads (a barrier over the block), __shfl_xor_sync and mma.sync
// m16n8k256 b1 AND.POPC (barriers over the warp; the fragment layout of the PTX
// ISA), cp.async with commit/wait groups (each copy lands as late as the PTX
// allows: at the wait that covers it, so a read before its wait sees stale
// shared memory), alignment and bounds checks on every cp.async source.
// Built with -fsanitize=thread it is a race checker too: its barriers are
// atomics only, so shared memory shared without a barrier is a reported race.
// What it cannot show: timing, bank conflicts, and anything the hardware does
// differently from the PTX ISA as modelled here (the mma probe checks that).
#pragma once
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaError_t = int;
using cudaStream_t = void*;
constexpr cudaError_t cudaSuccess = 0;

namespace emu {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cuda emulation: %s\n", what);
  std::abort();
}

struct Copy {
  void* dst;
  const void* src;
  int bytes;
  bool valid;
};

// Global buffers a cp.async may read ([begin, end)); registered by the caller.
inline std::vector<std::pair<const char*, const char*>>& buffers() {
  static std::vector<std::pair<const char*, const char*>> b;
  return b;
}
inline void register_buffer(const void* p, size_t bytes) {
  buffers().emplace_back(static_cast<const char*>(p), static_cast<const char*>(p) + bytes);
}

// A barrier of atomics only (no mutex): the happens-before edges it makes are
// exactly a barrier's, so a thread sanitizer build (-fsanitize=thread) sees a
// missing __syncthreads as the data race it is. (std::barrier waits through a
// process-wide pool of mutexes, whose locks order unrelated threads and hide
// races.)
class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void arrive_and_wait() {
    const unsigned phase = phase_.load(std::memory_order_acquire);
    if (count_.fetch_add(1, std::memory_order_acq_rel) == n_ - 1) {
      count_.store(0, std::memory_order_relaxed);
      phase_.fetch_add(1, std::memory_order_release);
    } else {
      while (phase_.load(std::memory_order_acquire) == phase) std::this_thread::yield();
    }
  }

 private:
  const int n_;
  std::atomic<int> count_{0};
  std::atomic<unsigned> phase_{0};
};

struct Block {
  explicit Block(int threads) : sync(threads), warps(threads / 32) {
    for (auto& w : warps) w = std::make_unique<Warp>();
  }
  struct Warp {
    Barrier bar{32};
    uint32_t regs[32][6];  // mma operands a0..a3, b0, b1 of each lane
    uint64_t shfl[32];
  };
  Barrier sync;
  std::vector<std::unique_ptr<Warp>> warps;
};

struct ThreadState {
  dim3 thread_idx, block_idx;
  Block* block = nullptr;
  std::vector<Copy> open;                 // issued, not yet committed
  std::vector<std::vector<Copy>> groups;  // committed, oldest first
};
inline thread_local ThreadState self;

inline Block::Warp& warp() {
  return *self.block->warps[self.thread_idx.x / 32];
}
inline int lane() {
  return self.thread_idx.x % 32;
}

inline void land(const std::vector<Copy>& group) {
  for (const Copy& c : group) {
    if (c.valid)
      std::memcpy(c.dst, c.src, c.bytes);
    else
      std::memset(c.dst, 0, c.bytes);
  }
}

template <class Kernel, class Params>
void launch(Kernel kernel, dim3 grid, int threads, const Params& p) {
  if (threads % 32 != 0) fail("block size must be a multiple of 32");
  Block block(threads);
  std::vector<std::thread> pool;
  for (int tid = 0; tid < threads; ++tid) {
    pool.emplace_back([&, tid] {
      self.thread_idx = dim3(tid);
      self.block = &block;
      for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx) {
          self.block_idx = dim3(bx, by);
          kernel(p);
          self.open.clear();
          self.groups.clear();
          block.sync.arrive_and_wait();  // the block is done: the next may reuse shared memory
        }
    });
  }
  for (auto& t : pool) t.join();
}

}  // namespace emu

#define threadIdx (::emu::self.thread_idx)
#define blockIdx (::emu::self.block_idx)

inline void __syncthreads() {
  emu::self.block->sync.arrive_and_wait();
}
inline int __popc(uint32_t v) {
  return __builtin_popcount(v);
}
inline float __fmul_rn(float a, float b) {
  return a * b;
}  // built with -ffp-contract=off
inline float __fadd_rn(float a, float b) {
  return a + b;
}

template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  static_assert(sizeof(T) <= 8, "32/64-bit values only");
  if (mask != 0xffffffffu) emu::fail("__shfl_xor_sync: only full-warp masks are emulated");
  auto& w = emu::warp();
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  w.shfl[emu::lane()] = bits;
  w.bar.arrive_and_wait();
  bits = w.shfl[emu::lane() ^ lane_mask];
  w.bar.arrive_and_wait();
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

namespace ctmq {

// mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc, from the PTX ISA's
// fragment layout (g = lane / 4, t = lane % 4): a0/a2 hold row g, a1/a3 row
// g + 8, bits [32t, 32t + 32) and 128 + that; b0/b1 column g, the same bits;
// c0/c1 row g, columns 2t and 2t + 1; c2/c3 row g + 8.
inline void mma_b1_and_popc(int (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                            uint32_t b1) {
  auto& w = emu::warp();
  const int l = emu::lane(), g = l / 4, t = l % 4;
  const uint32_t mine[6] = {a0, a1, a2, a3, b0, b1};
  std::memcpy(w.regs[l], mine, sizeof mine);
  w.bar.arrive_and_wait();
  // word q (0..7, 32 bits each) of row r of A and of column n of B
  const auto a_word = [&](int r, int q) { return w.regs[(r % 8) * 4 + q % 4][(r >= 8) + 2 * (q >= 4)]; };
  const auto b_word = [&](int n, int q) { return w.regs[n * 4 + q % 4][4 + (q >= 4)]; };
  for (int i = 0; i < 4; ++i) {
    const int r = g + 8 * (i / 2), n = 2 * t + i % 2;
    for (int q = 0; q < 8; ++q) c[i] += __builtin_popcount(a_word(r, q) & b_word(n, q));
  }
  w.bar.arrive_and_wait();  // the slots may be overwritten by the next call
}

template <int Bytes>
void cp_async_zfill(void* smem, const void* src, bool valid) {
  static_assert(Bytes == 4 || Bytes == 8 || Bytes == 16, "cp.async copies 4, 8 or 16 bytes");
  if (reinterpret_cast<uintptr_t>(smem) % Bytes) emu::fail("cp.async: shared address not aligned");
  if (valid) {
    if (reinterpret_cast<uintptr_t>(src) % Bytes) emu::fail("cp.async: global address not aligned");
    const char* s = static_cast<const char*>(src);
    bool inside = false;
    for (const auto& [b, e] : emu::buffers()) inside |= s >= b && s + Bytes <= e;
    if (!inside) emu::fail("cp.async: source outside every buffer");
  }
  emu::self.open.push_back({smem, src, Bytes, valid});
}

inline void cp_async_commit() {
  emu::self.groups.push_back(std::move(emu::self.open));
  emu::self.open.clear();
}

template <int N>
void cp_async_wait() {
  auto& groups = emu::self.groups;
  while (groups.size() > static_cast<size_t>(N)) {
    emu::land(groups.front());
    groups.erase(groups.begin());
  }
}

}  // namespace ctmq
