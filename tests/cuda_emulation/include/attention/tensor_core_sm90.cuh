// The emulator's stand-in for csrc/attention/tensor_core_sm90.cuh: mbarriers, TMA tensor loads,
// wgmma and setmaxnreg, written in C++ after the PTX ISA.
//   mbarrier: a phase completes when all expected arrivals and transaction bytes are in; waiting
//     on parity P returns once the phase of parity P has completed (the phase bit differs from P).
//   TMA: the box at the given coordinates, out-of-bounds elements zero, stored with the 128-byte
//     swizzle (16-byte chunk bits 4-6 of the shared address XOR bits 7-9); the copy lands at a
//     random later round of the scheduler (or at once), then counts its bytes on the mbarrier.
//   wgmma: operands read through their descriptors (start, leading and stride byte offsets,
//     128-byte swizzle), K-major or MN-major; A from registers in the mma.sync A layout per warp;
//     D in the accumulator layout. Done at issue (the kernels wait for every group before use);
//     wait_group meets the warp, so that every lane has done its reads.
#pragma once

#include <cuda.h>

#include <cstdint>
#include <cstring>

#include "attention/tensor_core.cuh"
#include "attention/tensor_map.cuh"
#include "emulator.h"

namespace bigkern {
namespace attention {
namespace sm90 {

inline void mbarrier_init(uint64_t* barrier, uint32_t arrivals) {
  using namespace emulation;
  if (!in_shared(barrier, 8)) return fail("mbarrier.init: not in the dynamic shared memory");
  Mbarrier* existing = find_mbarrier(barrier);
  Mbarrier fresh;
  fresh.expected = fresh.pending = static_cast<int>(arrivals);
  if (existing)
    *existing = fresh;
  else
    state().mbarriers.push_back({barrier, fresh});
  state().progressed_this_round = true;
}

inline void fence_barrier_init() {}

inline emulation::Mbarrier* live_mbarrier(uint64_t* barrier, const char* what) {
  emulation::Mbarrier* found = emulation::find_mbarrier(barrier);
  if (found == nullptr) emulation::fail(std::string(what) + ": mbarrier used before mbarrier.init");
  return found;
}

inline void mbarrier_arrive(uint64_t* barrier) {
  emulation::Mbarrier* b = live_mbarrier(barrier, "mbarrier.arrive");
  if (b == nullptr) return;
  if (b->pending <= 0) return emulation::fail("mbarrier.arrive: more arrivals than the barrier expects");
  --b->pending;
  emulation::mbarrier_progress(*b);
  emulation::state().progressed_this_round = true;
}

inline void mbarrier_arrive_expect_tx(uint64_t* barrier, uint32_t bytes) {
  emulation::Mbarrier* b = live_mbarrier(barrier, "mbarrier.arrive.expect_tx");
  if (b == nullptr) return;
  b->transaction_bytes += bytes;
  mbarrier_arrive(barrier);
}

inline void mbarrier_wait(uint64_t* barrier, uint32_t parity) {
  for (;;) {
    emulation::Mbarrier* b = live_mbarrier(barrier, "mbarrier.try_wait");
    if (b == nullptr || !emulation::state().error.empty() || b->phase != (parity & 1)) return;
    emulation::spin_yield();
  }
}

// ---- TMA -----------------------------------------------------------------------------------------

inline uint32_t swizzle_128b(uint32_t offset) { return offset ^ (((offset >> 7) & 7) << 4); }

inline void tma_load_4d(void* smem, const CUtensorMap* map, uint64_t* barrier, int c0, int c1, int c2, int c3) {
  using namespace emulation;
  EmulatedTensorMap m;
  std::memcpy(&m, map, sizeof(m));
  if (m.magic != EmulatedTensorMap::kMagic) return fail("TMA: not a tensor map made by the emulated encoder");
  if (!in_shared(smem, 16) || shared_address(smem) % 1024)
    return fail("TMA: 128B-swizzled destination must be 1024-byte aligned shared memory");
  const int coordinates[4] = {c0, c1, c2, c3};
  const int64_t box_elements = int64_t(m.box[0]) * m.box[1] * m.box[2] * m.box[3];
  const int64_t bytes = box_elements * m.element_bytes;
  if (!in_shared(smem, bytes)) return fail("TMA: box does not fit in the dynamic shared memory");
  const uint32_t destination = shared_address(smem);
  auto copy = [m, coordinates, destination, box_elements]() {
    for (int64_t i = 0; i < box_elements; ++i) {
      int64_t rest = i;
      bool inside = true;
      const char* source = m.base;
      for (int d = 0; d < 4; ++d) {
        const int64_t coordinate = coordinates[d] + rest % m.box[d];
        rest /= m.box[d];
        if (coordinate < 0 || coordinate >= int64_t(m.dims[d])) inside = false;
        source += coordinate * int64_t(m.strides[d]);
      }
      const uint32_t offset = swizzle_128b(destination + uint32_t(i * m.element_bytes));
      unsigned char* target = shared_raw + offset;
      if (!inside) {
        std::memset(target, 0, m.element_bytes);
      } else if (!readable(source, m.element_bytes)) {
        fail("TMA: source element outside every input tensor");
      } else {
        std::memcpy(target, source, m.element_bytes);
      }
    }
  };
  if (find_mbarrier(barrier) == nullptr) return fail("TMA: completes on an uninitialized mbarrier");
  AsyncCopy pending{copy, barrier, bytes};
  if (state().deferred_copies)
    state().async_copies.push_back(std::move(pending));
  else
    complete_async_copy(pending);
  state().progressed_this_round = true;
}

// ---- warpgroup MMA ---------------------------------------------------------------------------------

inline void wgmma_fence() {}
inline void wgmma_commit() {}
// On the GPU a warpgroup MMA is complete, shared-memory reads included, once wait_group returns.
// Here each lane computes its share when it resumes after the warp meets, so waiting means
// meeting the warp again: no lane goes on (say, to release a stage) before all have read.
template <int N>
inline void wgmma_wait() {
  emulation::warp_sync();
}

namespace detail {

struct Descriptor {
  uint32_t start, leading, stride;
  int swizzle;
  explicit Descriptor(uint64_t d)
      : start(uint32_t(d & 0x3FFF) << 4),
        leading(uint32_t((d >> 16) & 0x3FFF) << 4),
        stride(uint32_t((d >> 32) & 0x3FFF) << 4),
        swizzle(int(d >> 62)) {}
};

template <typename T>
inline float shared_element(uint32_t unswizzled_offset) {
  const uint32_t offset = swizzle_128b(unswizzled_offset);
  if (offset + 2 > emulation::state().shared_bytes) {
    emulation::fail("wgmma: operand outside the dynamic shared memory");
    return 0.f;
  }
  uint16_t bits;
  std::memcpy(&bits, shared_raw + offset, 2);
  return attention::detail::b16_to_float(bits, T{});
}

// K-major, 128-byte swizzle: row r (of M or N) in 8-row groups `stride` bytes apart, 128 bytes a row;
// k walks the row (the leading offset is unused).
template <typename T>
inline float k_major(const Descriptor& d, int row, int k) {
  if (d.swizzle != 1) emulation::fail("wgmma: the emulator knows the 128-byte swizzle only");
  return shared_element<T>(d.start + (row / 8) * d.stride + (row % 8) * 128 + k * 2);
}

// MN-major, 128-byte swizzle: 64 elements of N per 128-byte row, one row per k, 8-row groups
// `stride` bytes apart, the next 64 of N `leading` bytes on.
template <typename T>
inline float mn_major(const Descriptor& d, int k, int n) {
  if (d.swizzle != 1) emulation::fail("wgmma: the emulator knows the 128-byte swizzle only");
  return shared_element<T>(d.start + (n / 64) * d.leading + (k / 8) * d.stride + (k % 8) * 128 + (n % 64) * 2);
}

}  // namespace detail

template <typename T, int N>
struct Wgmma {
  // d (+)= A (64 x 16, K-major smem) * B (16 x N, K-major smem); this thread's elements only.
  static void ss(float (&d)[N / 8][4], uint64_t desc_a, uint64_t desc_b, int accumulate) {
    const detail::Descriptor a(desc_a), b(desc_b);
    const int thread = emulation::linear_thread() % 128, warp = thread / 32, lane = thread % 32;
    for (int j = 0; j < N / 8; ++j)
      for (int e = 0; e < 4; ++e) {
        const int row = warp * 16 + lane / 4 + 8 * (e / 2), col = 8 * j + 2 * (lane % 4) + e % 2;
        double sum = 0.0;
        for (int k = 0; k < 16; ++k) sum += double(detail::k_major<T>(a, row, k)) * detail::k_major<T>(b, col, k);
        d[j][e] = static_cast<float>((accumulate ? d[j][e] : 0.f) + sum);
      }
  }

  // d (+)= A (each warp's 16 x 16 in registers, mma.sync A layout) * B (16 x N, MN-major smem).
  static void rs(float (&d)[N / 8][4], const uint32_t (&a)[4], uint64_t desc_b, int accumulate) {
    using namespace emulation;
    WarpSlots& slots = slots_for_next_operation();
    for (int r = 0; r < 4; ++r) slots.words[lane()][r] = a[r];
    warp_sync();
    const detail::Descriptor b(desc_b);
    const int t = lane();
    for (int j = 0; j < N / 8; ++j)
      for (int e = 0; e < 4; ++e) {
        const int row = t / 4 + 8 * (e / 2), col = 8 * j + 2 * (t % 4) + e % 2;
        double sum = 0.0;
        for (int k = 0; k < 16; ++k) {
          const uint32_t word = slots.words[(row % 8) * 4 + (k % 8) / 2][row / 8 + 2 * (k / 8)];
          const float a_element = attention::detail::b16_to_float(
              static_cast<uint16_t>(k % 2 ? word >> 16 : word & 0xffff), T{});
          sum += double(a_element) * detail::mn_major<T>(b, k, col);
        }
        d[j][e] = static_cast<float>((accumulate ? d[j][e] : 0.f) + sum);
      }
  }
};

template <int REGISTERS>
inline void setmaxnreg_decrease() {}
template <int REGISTERS>
inline void setmaxnreg_increase() {}

}  // namespace sm90
}  // namespace attention
}  // namespace bigkern
