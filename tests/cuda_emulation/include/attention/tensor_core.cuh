// The emulator's stand-in for csrc/attention/tensor_core.cuh: the same functions, written in C++
// after the PTX ISA's definitions of cp.async, ldmatrix, mma.sync.m16n8k16 and ex2.approx.
// Found first on the include path of tests/cuda_emulation/, so the kernels include this instead.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "emulator.h"

namespace bigkern {
namespace attention {

// Shared addresses are offsets into the dynamic shared memory (1024-byte aligned, like the GPU's
// shared window), so swizzle patterns computed from address bits agree with the GPU's.
inline uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(static_cast<const unsigned char*>(p) - bigkern::attention::shared_raw);
}

inline void cp_async_16(void* smem, const void* gmem, bool valid) {
  using namespace emulation;
  if (!in_shared(smem, 16) || reinterpret_cast<uintptr_t>(smem) % 16) {
    fail("cp.async: destination outside the dynamic shared memory or not 16-byte aligned");
    return;
  }
  if (reinterpret_cast<uintptr_t>(gmem) % 16) {
    fail("cp.async: source not 16-byte aligned");
    return;
  }
  if (valid && !readable(gmem, 16)) {
    fail("cp.async: source outside every input tensor");
    return;
  }
  const Copy copy{smem, gmem, valid};
  if (state().deferred_copies)
    self().uncommitted.push_back(copy);
  else
    run_copy(copy);
}

inline void cp_async_commit() {
  emulation::Fiber& fiber = emulation::self();
  fiber.in_flight.push_back(std::move(fiber.uncommitted));
  fiber.uncommitted.clear();
}

// Retire (perform) every committed group but the newest N.
template <int N>
inline void cp_async_wait() {
  emulation::Fiber& fiber = emulation::self();
  while (fiber.in_flight.size() > static_cast<size_t>(N)) {
    for (const emulation::Copy& copy : fiber.in_flight.front()) emulation::run_copy(copy);
    fiber.in_flight.erase(fiber.in_flight.begin());
  }
}

namespace detail {

inline uint16_t shared_b16(const void* row, int column) {
  uint16_t value;
  std::memcpy(&value, static_cast<const char*>(row) + 2 * column, 2);
  return value;
}

// Lanes 8i..8i+7 give the rows of matrix i. Plain: lane t gets row t/4, columns 2(t%4), 2(t%4)+1;
// transposed: rows 2(t%4), 2(t%4)+1 of column t/4. Lower 16 bits: the lower index.
inline void ldmatrix(uint32_t (&r)[4], const void* smem, bool transposed) {
  using namespace emulation;
  if (!in_shared(smem, 16) || reinterpret_cast<uintptr_t>(smem) % 16)
    fail("ldmatrix: row address outside the dynamic shared memory or not 16-byte aligned");
  WarpSlots& slots = slots_for_next_operation();
  slots.address[lane()] = in_shared(smem, 16) ? smem : bigkern::attention::shared_raw;
  warp_sync();
  const int t = lane();
  for (int i = 0; i < 4; ++i) {
    const void* const* rows = slots.address + 8 * i;
    uint16_t lo, hi;
    if (transposed) {
      lo = shared_b16(rows[2 * (t % 4)], t / 4);
      hi = shared_b16(rows[2 * (t % 4) + 1], t / 4);
    } else {
      lo = shared_b16(rows[t / 4], 2 * (t % 4));
      hi = shared_b16(rows[t / 4], 2 * (t % 4) + 1);
    }
    r[i] = uint32_t(lo) | (uint32_t(hi) << 16);
  }
}

// 16-bit patterns to float: fp16 through a table built once, bf16 by a shift.
inline float b16_to_float(uint16_t bits, __half) {
  static const std::vector<float> table = [] {
    std::vector<float> t(65536);
    for (uint32_t i = 0; i < 65536; ++i) {
      __half_raw raw;
      raw.x = static_cast<unsigned short>(i);
      t[i] = __half2float(__half(raw));
    }
    return t;
  }();
  return table[bits];
}

inline float b16_to_float(uint16_t bits, __nv_bfloat16) {
  const uint32_t word = uint32_t(bits) << 16;
  float f;
  std::memcpy(&f, &word, 4);
  return f;
}

}  // namespace detail

inline void ldmatrix_x4(uint32_t (&r)[4], const void* smem) { detail::ldmatrix(r, smem, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) { detail::ldmatrix(r, smem, true); }

// D (16x8) = A (16x16) B (16x8) + C, fp32 accumulation. Per the PTX ISA, with g = lane / 4 and
// c = lane % 4: A register r holds row g + 8 (r % 2), columns 2c + 8 (r / 2) + {0, 1}; B register r
// holds rows (k) 2c + 8 r + {0, 1} of column g; C/D element e is row g + 8 (e / 2), column 2c + e % 2.
template <typename T>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  using namespace emulation;
  WarpSlots& slots = slots_for_next_operation();
  uint32_t* mine = slots.words[lane()];
  for (int r = 0; r < 4; ++r) mine[r] = a[r];
  mine[4] = b0;
  mine[5] = b1;
  warp_sync();
  if (!slots.decoded) {
    auto element = [&](int source_lane, int reg, int k) {
      const uint32_t word = slots.words[source_lane][reg];
      return detail::b16_to_float(static_cast<uint16_t>(k % 2 ? word >> 16 : word & 0xffff), T{});
    };
    for (int k = 0; k < 16; ++k) {
      const int k_lane = (k % 8) / 2;  // which lane of a quad holds column (or row) k
      for (int row = 0; row < 16; ++row) slots.a[row][k] = element((row % 8) * 4 + k_lane, row / 8 + 2 * (k / 8), k);
      for (int col = 0; col < 8; ++col) slots.b[k][col] = element(col * 4 + k_lane, 4 + k / 8, k);
    }
    slots.decoded = true;
  }
  const int t = lane();
  for (int e = 0; e < 4; ++e) {
    const int row = t / 4 + 8 * (e / 2);
    const int col = 2 * (t % 4) + e % 2;
    double sum = 0.0;
    for (int k = 0; k < 16; ++k) sum += double(slots.a[row][k]) * slots.b[k][col];
    d[e] = static_cast<float>(d[e] + sum);
  }
}

inline float fast_exp2(float x) { return std::exp2(x); }

}  // namespace attention
}  // namespace bigkern
