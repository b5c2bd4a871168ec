// A CPU stand-in for the CUDA execution model, enough to run sdstream's plain CUDA kernels (no
// inline PTX, no tensor cores) on a machine without a GPU. Every CUDA thread of a block is a
// fiber on the calling thread (x86-64: a stack switch of a few instructions, where ucontext's
// would make a system call per switch); `__syncthreads` and a warp's shuffles are barriers at
// which a fiber yields until every thread of its block (or lanes of its warp) has arrived, a
// shuffle's value passing through memory between two such barriers; `__shared__` variables are
// statics (blocks run one at a time, in order). It checks a kernel's indexing, reductions and
// arithmetic, not its speed or its memory model; being single-threaded, it is deterministic.
//
// Force-included before a .cu file by kernels/emulate/run.sh (g++ with CUDA's headers, which
// compile their f16/bf16 conversions for the host).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <type_traits>
#include <vector>

// The .cu files' switch for their CPU stand-ins (kernels/emulate/ptx.h).
#define SDSTREAM_EMULATED 1

#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __forceinline__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
// One block runs at a time, so a block's shared memory can be a static.
#define __shared__ static
#undef __launch_bounds__
#define __launch_bounds__(...)
// A kernel's promise that a pointer is aligned (storage.cuh), checked.
#define SDSTREAM_ASSUME_ALIGNED(POINTER, BYTES)                                                  \
  do {                                                                                           \
    if (reinterpret_cast<uintptr_t>(POINTER) % (BYTES) != 0) {                                   \
      std::fprintf(stderr, "emulate: %s is not %d-byte aligned\n", #POINTER, (int)(BYTES));     \
      std::abort();                                                                              \
    }                                                                                            \
  } while (0)
// A launch's dynamic shared memory (storage.cuh's SDSTREAM_DYNAMIC_SHARED).
#define SDSTREAM_DYNAMIC_SHARED(NAME) unsigned char *NAME = emu::dynamic_shared

struct emu_dim3 {
  unsigned x = 1, y = 1, z = 1;
};

namespace emu {

// The running fiber's indices (set by the scheduler before it resumes a fiber).
inline emu_dim3 thread_idx;
inline emu_dim3 block_idx;
inline unsigned linear_thread = 0;
inline emu_dim3 block_dim;
inline emu_dim3 grid_dim;

// A barrier among `expected` fibers: the last to arrive opens a new generation.
struct Barrier {
  unsigned expected = 0, arrived = 0, generation = 0;
};

// Saves the callee-saved registers on the running stack, stores its pointer in *from, and
// resumes the stack at `to` (where the same was saved, or a new fiber's first frame).
extern "C" void emu_switch(void **from, void *to);
asm(R"(
  .text
  .globl emu_switch
  .type emu_switch, @function
emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_switch, .-emu_switch
)");

struct Fiber {
  void *sp = nullptr;
  std::vector<unsigned char> stack;
  bool done = false;
};

inline void *scheduler_sp = nullptr;
inline std::vector<Fiber> fibers;
inline Barrier block_barrier;
inline std::vector<Barrier> warp_barriers;
// A warp's exchange slots, one per lane, wide enough for any shuffled scalar.
struct alignas(16) Slot {
  unsigned char bytes[16];
};
inline std::vector<Slot> warp_slots;

// Back to the scheduler, which resumes the next fiber.
inline void yield() { emu_switch(&fibers[linear_thread].sp, scheduler_sp); }

inline void wait(Barrier &b) {
  const unsigned generation = b.generation;
  if (++b.arrived == b.expected) {
    b.arrived = 0;
    ++b.generation;
    return;
  }
  while (b.generation == generation) yield();
}

template <typename T> T shuffle(T v, int src_lane) {
  static_assert(sizeof(T) <= sizeof(Slot), "shuffled value too wide");
  const unsigned warp = linear_thread / 32;
  const unsigned lane = linear_thread % 32;
  const unsigned lanes = warp_barriers[warp].expected;
  std::memcpy(warp_slots[warp * 32 + lane].bytes, &v, sizeof(T));
  wait(warp_barriers[warp]);
  T r = v;
  if (src_lane >= 0 && static_cast<unsigned>(src_lane) < lanes)
    std::memcpy(&r, warp_slots[warp * 32 + src_lane].bytes, sizeof(T));
  wait(warp_barriers[warp]);
  return r;
}

// Dynamic shared memory: as much as an H100 block may have. Filled with 0xFF bytes (NaN in
// every float type) at each block's start, so that a read of what no thread wrote shows.
alignas(128) inline unsigned char dynamic_shared[232448];
// Called at each block's start by every part of the stand-in that keeps state per block.
inline std::vector<void (*)()> block_start_hooks;

inline std::function<void()> body;

// A fiber's first frame: the kernel, then back to the scheduler for good.
inline void fiber_main() {
  body();
  fibers[linear_thread].done = true;
  emu_switch(&fibers[linear_thread].sp, scheduler_sp);
  std::abort();  // a finished fiber is never resumed
}

// A new fiber's stack: six zeroed registers for emu_switch to pop, then fiber_main's address
// for its `ret`, placed so that fiber_main starts with the stack aligned as after a call.
inline void *first_frame(std::vector<unsigned char> &stack) {
  auto top = reinterpret_cast<uintptr_t>(stack.data() + stack.size()) & ~uintptr_t{15};
  auto *slots = reinterpret_cast<void **>(top - 16);
  slots[0] = reinterpret_cast<void *>(&fiber_main);
  for (int i = 1; i <= 6; ++i) slots[-i] = nullptr;
  return slots - 6;
}

// Runs `kernel(args...)` over the grid with `shared_bytes` of dynamic shared memory, one block
// after another, the block's threads as fibers resumed round-robin until all have returned.
template <typename... P, typename... A>
void launch_shared(void (*kernel)(P...), emu_dim3 grid, emu_dim3 block, size_t shared_bytes,
                   A... args) {
  constexpr size_t kStack = 256 * 1024;
  if (shared_bytes > sizeof dynamic_shared) {
    std::fprintf(stderr, "emulate: %zu bytes of dynamic shared memory asked for\n", shared_bytes);
    std::abort();
  }
  block_dim = block;
  grid_dim = grid;
  const unsigned threads = block.x * block.y * block.z;
  const unsigned warps = (threads + 31) / 32;
  warp_slots.assign(warps * 32, Slot{});
  // Fibers (and their stacks) are kept from launch to launch, never shrunk.
  if (fibers.size() < threads) fibers.resize(threads);
  for (auto &f : fibers)
    if (f.stack.size() != kStack) f.stack.assign(kStack, 0);
  body = [&] { kernel(static_cast<P>(args)...); };
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        block_idx = emu_dim3{bx, by, bz};
        std::memset(dynamic_shared, 0xff, shared_bytes);
        for (auto hook : block_start_hooks) hook();
        block_barrier = Barrier{threads};
        warp_barriers.assign(warps, Barrier{});
        for (unsigned w = 0; w < warps; ++w) warp_barriers[w].expected = std::min(32u, threads - w * 32);
        for (unsigned t = 0; t < threads; ++t) {
          fibers[t].done = false;
          fibers[t].sp = first_frame(fibers[t].stack);
        }
        for (unsigned running = threads; running > 0;) {
          running = 0;
          for (unsigned t = 0; t < threads; ++t) {
            if (fibers[t].done) continue;
            linear_thread = t;
            thread_idx = emu_dim3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
            emu_switch(&scheduler_sp, fibers[t].sp);
            if (!fibers[t].done) ++running;
          }
        }
      }
}

// `launch_shared` without dynamic shared memory.
template <typename... P, typename... A>
void launch(void (*kernel)(P...), emu_dim3 grid, emu_dim3 block, A... args) {
  launch_shared(kernel, grid, block, 0, args...);
}

}  // namespace emu

#define threadIdx (emu::thread_idx)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)

inline void __syncthreads() { emu::wait(emu::block_barrier); }
inline void __syncwarp(unsigned = 0xffffffffu) {
  emu::wait(emu::warp_barriers[emu::linear_thread / 32]);
}
inline void __threadfence() {}

template <typename T> T __shfl_down_sync(unsigned, T v, unsigned delta, int = 32) {
  return emu::shuffle(v, static_cast<int>(emu::linear_thread % 32 + delta));
}
template <typename T> T __shfl_xor_sync(unsigned, T v, int mask, int = 32) {
  return emu::shuffle(v, static_cast<int>((emu::linear_thread % 32) ^ mask));
}
template <typename T> T __shfl_sync(unsigned, T v, int src, int = 32) {
  return emu::shuffle(v, src & 31);
}

inline float __expf(float x) { return std::exp(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __fdividef(float a, float b) { return a / b; }
template <typename A, typename B> inline auto min(A a, B b) -> std::common_type_t<A, B> {
  return a < b ? a : b;
}
template <typename A, typename B> inline auto max(A a, B b) -> std::common_type_t<A, B> {
  return a > b ? a : b;
}
