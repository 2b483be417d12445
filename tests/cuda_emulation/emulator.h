// A small CUDA emulator for the CPU, enough to run the sm_80 flash-attention kernels of
// csrc/attention/ exactly as written: every CUDA thread of a CTA is a fiber (ucontext), CTAs run one
// after another, and the PTX of attention/tensor_core.cuh (cp.async, ldmatrix, mma.sync, ex2) is
// replaced by C++ with the semantics of the PTX ISA (include/attention/tensor_core.cuh).
//
// What it checks besides the numbers: shared-memory accesses stay inside the launch's dynamic
// shared memory and are 16-byte aligned; cp.async sources are 16-byte aligned and inside the
// tensors registered as readable; no thread ends with copies it never waited for; no deadlock at a
// barrier. Shared memory starts as NaN. Copies run either at once ("eager") or only when a
// cp.async.wait_group retires them ("deferred"); the fibers run in a shuffled order between
// barriers, with random warps held back for a round so that warps drift apart. So reading a stage
// before waiting for it, or refilling one another warp still reads, changes the result.
//
// It is a test tool: one CTA at a time, one thread, slow (about a microsecond per fiber switch).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <ucontext.h>

#include <algorithm>
#include <barrier>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

// Switching between fibers: on x86-64 a few instructions that save the callee-saved registers on
// the old stack and continue on the new one (glibc's swapcontext makes a system call each time,
// some 50x slower); elsewhere ucontext.
#if defined(__x86_64__)
#define EMULATION_FAST_SWITCH 1
extern "C" void emulation_switch(void** save_stack, void* next_stack);
asm(R"(
    .text
    .globl emulation_switch
    .type emulation_switch, @function
emulation_switch:
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
    .size emulation_switch, .-emulation_switch
)");
#else
#define EMULATION_FAST_SWITCH 0
#endif

namespace emulation {

constexpr size_t kStackBytes = 256 * 1024;

struct Copy {
  void* dst;
  const void* src;
  bool valid;
};

struct Barrier {
  int expected = 0;
  int arrived = 0;
  uint64_t generation = 0;
};

struct Fiber {
  ucontext_t context;   // without the fast switch
  void* stack_pointer;  // with it
  char* stack;          // kStackBytes from the state's pool
  uint3 thread_idx;
  bool done = false;
  Barrier* waiting_on = nullptr;
  uint64_t waiting_generation = 0;
  std::vector<Copy> uncommitted;
  std::vector<std::vector<Copy>> in_flight;  // committed groups, oldest first
};

struct Range {
  const char* begin;
  const char* end;
};

// An mbarrier (PTX ISA semantics): a phase completes when every expected arrival has arrived and
// every expected transaction byte has landed; the phase bit then flips.
struct Mbarrier {
  int expected = 0;
  int pending = 0;
  int64_t transaction_bytes = 0;
  uint32_t phase = 0;
};

// A TMA copy in flight: done later by the scheduler (or at once), then counted on its mbarrier.
struct AsyncCopy {
  std::function<void()> copy;
  void* barrier;
  int64_t bytes;
};

// Exchange slots for warp-wide operations: each lane posts, the warp meets, each lane reads. Two
// sets used in turn, so one meeting per operation suffices: a lane can only post into a set again
// after the next operation's meeting, which every lane reaches after reading this one.
struct WarpSlots {
  uint32_t words[32][6];
  float value[32];
  const void* address[32];
  // an mma's operands, decoded once by the first lane to read them
  bool decoded;
  float a[16][16];
  float b[16][8];
};

struct WarpExchange {
  WarpSlots sets[2];
  int lane_turn[32] = {};  // which set each lane uses next
};

struct State {
  // configuration, set by the test driver
  bool deferred_copies = true;
  std::mt19937 random{12345};
  std::vector<Range> readable;
  std::string error;  // the first problem found

  // the CTA being run
  uint3 block_idx, grid_dim, block_dim;
  size_t shared_bytes = 0;
  std::vector<Fiber> fibers;
  std::vector<std::unique_ptr<char[]>> stacks;  // one per thread, kept from launch to launch
  std::vector<Barrier> warp_barriers;
  std::vector<WarpExchange> warp_slots;
  Barrier block_barrier;
  ucontext_t scheduler;
  void* scheduler_stack_pointer = nullptr;
  std::vector<std::pair<const void*, Mbarrier>> mbarriers;
  std::vector<AsyncCopy> async_copies;
  bool progressed_this_round = false;  // anything but a spin on an mbarrier
  int current = -1;
  std::function<void()> body;
};

// One per OS thread: a cooperative launch runs each CTA on a thread of its own (include/common/launch.cuh).
inline State& state() {
  static thread_local State s;
  return s;
}

// Dynamic shared memory for kernels that declare it with BIGKERN_DYNAMIC_SHARED: one per OS thread,
// so one per CTA of a cooperative launch.
inline unsigned char* cta_shared_memory() {
  alignas(16) static thread_local unsigned char memory[256 * 1024];
  return memory;
}

// The barrier of the cooperative launch in progress (include/common/launch.cuh), if any.
struct GridBarrier {
  static inline std::barrier<>* current = nullptr;
};

// The most dynamic shared memory any launch asked for (the tests read it against what bigkern's
// Python side says each kernel family needs, e.g. attention_cuda.SHARED_BYTES).
inline size_t largest_shared_launch = 0;

inline void fail(const std::string& what) {
  if (state().error.empty()) state().error = what;
}

// What a driver's C entry point returns: 0, or 1 with the first problem found (or the launcher's
// error) copied into `error`; the problem is then cleared for the next call.
inline int report(cudaError_t status, char* error, int error_size) {
  std::string message = state().error;
  state().error.clear();
  if (message.empty() && status != cudaSuccess) message = std::string("launcher returned ") + cudaGetErrorName(status);
  if (message.empty()) return 0;
  std::strncpy(error, message.c_str(), error_size - 1);
  error[error_size - 1] = '\0';
  return 1;
}

inline Fiber& self() { return state().fibers[state().current]; }

inline int linear_thread() {
  const uint3 t = self().thread_idx;
  const uint3 d = state().block_dim;
  return static_cast<int>((t.z * d.y + t.y) * d.x + t.x);
}

inline int lane() { return linear_thread() % 32; }
inline int warp() { return linear_thread() / 32; }

inline void arrive_and_wait(Barrier& barrier) {
  state().progressed_this_round = true;
  const uint64_t generation = barrier.generation;
  if (++barrier.arrived == barrier.expected) {
    barrier.arrived = 0;
    ++barrier.generation;
  }
  Fiber& fiber = self();
  fiber.waiting_on = &barrier;
  fiber.waiting_generation = generation;
  // always yield, so that other fibers run between any two barriers
#if EMULATION_FAST_SWITCH
  emulation_switch(&fiber.stack_pointer, state().scheduler_stack_pointer);
#else
  swapcontext(&fiber.context, &state().scheduler);
#endif
}

inline void warp_sync() { arrive_and_wait(state().warp_barriers[warp()]); }

// Give the other threads a turn (a thread spinning on an mbarrier).
inline void spin_yield() {
  Fiber& fiber = self();
  fiber.waiting_on = nullptr;
#if EMULATION_FAST_SWITCH
  emulation_switch(&fiber.stack_pointer, state().scheduler_stack_pointer);
#else
  swapcontext(&fiber.context, &state().scheduler);
#endif
}

inline Mbarrier* find_mbarrier(const void* address) {
  for (auto& entry : state().mbarriers)
    if (entry.first == address) return &entry.second;
  return nullptr;
}

inline void mbarrier_progress(Mbarrier& barrier) {
  if (barrier.pending == 0 && barrier.transaction_bytes == 0) {
    barrier.phase ^= 1;
    barrier.pending = barrier.expected;
  }
}

inline void complete_async_copy(AsyncCopy& copy) {
  copy.copy();
  Mbarrier* barrier = find_mbarrier(copy.barrier);
  if (barrier == nullptr) {
    fail("a TMA copy completes on an uninitialized mbarrier");
    return;
  }
  barrier->transaction_bytes -= copy.bytes;
  mbarrier_progress(*barrier);
}

// The slot set this lane posts into for its next warp-wide operation (then read after warp_sync()).
inline WarpSlots& slots_for_next_operation() {
  WarpExchange& exchange = state().warp_slots[warp()];
  int& turn = exchange.lane_turn[lane()];
  WarpSlots& slots = exchange.sets[turn];
  turn ^= 1;
  slots.decoded = false;  // every lane clears it before the meeting; the first reader after sets it
  return slots;
}

}  // namespace emulation

// The dynamic shared memory of the CTA being run (kernels declare it `extern __shared__`; the
// Hopper kernel does so in namespace sm90, hence the alias). One translation unit includes this.
namespace bigkern {
namespace attention {
alignas(1024) unsigned char shared_raw[256 * 1024];
namespace sm90 {
extern unsigned char shared_raw[256 * 1024] __attribute__((alias("_ZN7bigkern9attention10shared_rawE")));
}  // namespace sm90
}  // namespace attention
}  // namespace bigkern

namespace emulation {

inline bool in_shared(const void* p, size_t bytes) {
  const char* c = static_cast<const char*>(p);
  const char* base = reinterpret_cast<const char*>(bigkern::attention::shared_raw);
  return c >= base && c + bytes <= base + state().shared_bytes;
}

inline bool readable(const void* p, size_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (const Range& r : state().readable)
    if (c >= r.begin && c + bytes <= r.end) return true;
  return false;
}

inline void run_copy(const Copy& copy) {
  if (copy.valid)
    std::memcpy(copy.dst, copy.src, 16);
  else
    std::memset(copy.dst, 0, 16);
}

inline void finish_fiber();

inline void fiber_main() {
  state().body();
  finish_fiber();
#if EMULATION_FAST_SWITCH
  Fiber& fiber = self();
  emulation_switch(&fiber.stack_pointer, state().scheduler_stack_pointer);  // never comes back
  __builtin_trap();
#endif
}  // without the fast switch: returns to the scheduler through uc_link

inline void finish_fiber() {
  State& s = state();
  s.progressed_this_round = true;
  Fiber& fiber = self();
  if (!fiber.uncommitted.empty() || !fiber.in_flight.empty())
    fail("a thread ended with cp.async copies it never waited for");
  fiber.done = true;
  // a finished thread no longer counts at barriers (as on the GPU)
  for (Barrier* barrier : {&s.block_barrier, &s.warp_barriers[warp()]}) {
    --barrier->expected;
    if (barrier->arrived > 0 && barrier->arrived == barrier->expected) {
      barrier->arrived = 0;
      ++barrier->generation;
    }
  }
}

// Run one CTA of `threads` threads to completion.
inline void run_block(uint3 block_idx, uint3 grid_dim, int threads, size_t shared_bytes, std::function<void()> body) {
  State& s = state();
  s.block_idx = block_idx;
  s.grid_dim = grid_dim;
  s.block_dim = make_uint3(threads, 1, 1);
  s.shared_bytes = shared_bytes;
  s.body = std::move(body);
  // NaN in every 16-bit and 32-bit float view, in both kinds of dynamic shared memory (the one
  // shared_raw is for one CTA at a time: not the CTAs of a cooperative launch, running at once)
  if (GridBarrier::current == nullptr) std::memset(bigkern::attention::shared_raw, 0xff, shared_bytes);
  std::memset(cta_shared_memory(), 0xff, shared_bytes);
  const int warps = (threads + 31) / 32;
  s.warp_barriers.assign(warps, Barrier{});
  for (int w = 0; w < warps; ++w) s.warp_barriers[w].expected = std::min(32, threads - 32 * w);
  s.warp_slots.assign(warps, WarpExchange{});
  s.block_barrier = Barrier{};
  s.block_barrier.expected = threads;
  s.mbarriers.clear();
  s.async_copies.clear();
  s.fibers.clear();
  s.fibers.resize(threads);
  while (s.stacks.size() < size_t(threads)) s.stacks.emplace_back(new char[kStackBytes]);
  for (int t = 0; t < threads; ++t) {
    Fiber& fiber = s.fibers[t];
    fiber.thread_idx = make_uint3(t, 0, 0);
    fiber.stack = s.stacks[t].get();
#if EMULATION_FAST_SWITCH
    // a stack as emulation_switch leaves it: six saved registers, then the address to return to,
    // placed so that fiber_main starts with the stack alignment of a called function
    uintptr_t top = (reinterpret_cast<uintptr_t>(fiber.stack) + kStackBytes) & ~uintptr_t(15);
    void** frame = reinterpret_cast<void**>(top - 64);
    for (int i = 0; i < 6; ++i) frame[i] = nullptr;
    frame[6] = reinterpret_cast<void*>(&fiber_main);
    fiber.stack_pointer = frame;
#else
    getcontext(&fiber.context);
    fiber.context.uc_stack.ss_sp = fiber.stack;
    fiber.context.uc_stack.ss_size = kStackBytes;
    fiber.context.uc_link = &s.scheduler;
    makecontext(&fiber.context, fiber_main, 0);
#endif
  }
  std::vector<int> order(threads);
  for (int t = 0; t < threads; ++t) order[t] = t;
  std::vector<char> paused(warps);
  int idle_rounds = 0;
  for (;;) {
    // copies in flight land at random times (each round, each with probability 1/2)
    for (size_t i = 0; i < s.async_copies.size();) {
      if (s.random() % 2 == 0) {
        AsyncCopy copy = std::move(s.async_copies[i]);
        s.async_copies.erase(s.async_copies.begin() + i);
        complete_async_copy(copy);
        s.progressed_this_round = true;
      } else {
        ++i;
      }
    }
    bool all_done = true, progressed = false, held_back = false;
    std::shuffle(order.begin(), order.end(), s.random);
    // hold random warps back this round (each half the time), so that warps drift apart as on a GPU
    for (int w = 0; w < warps; ++w) paused[w] = s.random() % 2 == 0;
    for (int t : order) {
      Fiber& fiber = s.fibers[t];
      if (fiber.done) continue;
      all_done = false;
      if (fiber.waiting_on != nullptr && fiber.waiting_on->generation == fiber.waiting_generation) continue;
      if (paused[t / 32]) {
        held_back = true;
        continue;
      }
      fiber.waiting_on = nullptr;
      s.current = t;
#if EMULATION_FAST_SWITCH
      emulation_switch(&s.scheduler_stack_pointer, fiber.stack_pointer);
#else
      swapcontext(&s.scheduler, &fiber.context);
#endif
      progressed = true;
    }
    if (all_done) break;
    if (!progressed && !held_back) {
      fail("deadlock: every live thread waits at a barrier that cannot complete");
      break;
    }
    // threads that only spin on mbarriers, with nothing in flight, wait forever (a warp is held
    // back half the rounds at random, so 1000 rounds without progress are no accident)
    idle_rounds = s.progressed_this_round || !s.async_copies.empty() ? 0 : idle_rounds + 1;
    s.progressed_this_round = false;
    if (idle_rounds > 1000) {
      fail("deadlock: threads wait on mbarriers whose phase can never complete");
      break;
    }
  }
  s.current = -1;
}

}  // namespace emulation

// ---------------------------------------------------------------------------------------------
// The CUDA built-ins the kernels use.

#define threadIdx (::emulation::self().thread_idx)
#define blockIdx (::emulation::state().block_idx)
#define gridDim (::emulation::state().grid_dim)
#define blockDim (::emulation::state().block_dim)

inline void __syncthreads() { emulation::arrive_and_wait(emulation::state().block_barrier); }

inline float __shfl_xor_sync(unsigned, float value, int lane_mask) {
  using namespace emulation;
  WarpSlots& slots = slots_for_next_operation();
  slots.value[lane()] = value;
  warp_sync();
  return slots.value[lane() ^ lane_mask];
}

inline float __shfl_down_sync(unsigned, float value, unsigned delta) {
  using namespace emulation;
  WarpSlots& slots = slots_for_next_operation();
  slots.value[lane()] = value;
  warp_sync();
  const int source = lane() + int(delta);
  return source < 32 ? slots.value[source] : value;  // lanes past the warp keep their own value
}

// ld.global.cg: a load through L2. Here every load sees memory as the other threads left it.
template <typename T>
inline T __ldcg(const T* p) {
  return *p;
}

#undef __launch_bounds__
#define __launch_bounds__(...)

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
