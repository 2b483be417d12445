// Thin wrappers over the sm_90a PTX of the Hopper forward (flash_forward_sm90.cuh): mbarriers, TMA
// tensor loads, wgmma (warpgroup MMA) with shared-memory descriptors, setmaxnreg. Everything here
// assembles only for sm_90a: callers guard their bodies with __CUDA_ARCH_FEAT_SM90_ALL.
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "attention/tensor_core.cuh"

namespace bigkern {
namespace attention {
namespace sm90 {

// ---- mbarriers (in shared memory, 8 bytes each) --------------------------------------------------

__device__ __forceinline__ void mbarrier_init(uint64_t* barrier, uint32_t arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(shared_address(barrier)), "r"(arrivals) : "memory");
}

// Make initialized barriers visible to the async proxy (TMA) and the other threads' next steps.
__device__ __forceinline__ void fence_barrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

__device__ __forceinline__ void mbarrier_arrive(uint64_t* barrier) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(shared_address(barrier)) : "memory");
}

// Arrive, and tell the barrier to expect `bytes` more from asynchronous copies in this phase.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* barrier, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(shared_address(barrier)), "r"(bytes)
               : "memory");
}

// Wait until the barrier's phase with this parity has completed.
__device__ __forceinline__ void mbarrier_wait(uint64_t* barrier, uint32_t parity) {
  uint32_t done = 0;
  while (!done) {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(shared_address(barrier)), "r"(parity)
        : "memory");
  }
}

// ---- TMA ---------------------------------------------------------------------------------------

// Copy the box at coordinates (c0 innermost .. c3) of a 4-d tensor map into shared memory; the
// barrier's transaction count drops by the box's bytes when it lands (out-of-bounds elements: 0).
__device__ __forceinline__ void tma_load_4d(void* smem, const CUtensorMap* map, uint64_t* barrier, int c0, int c1,
                                            int c2, int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5, %6}], "
      "[%2];\n" ::"r"(shared_address(smem)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(shared_address(barrier)), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
}

// ---- warpgroup MMA -------------------------------------------------------------------------------

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// Accumulators are the flash_tiles.cuh layout: d[j][e] of a warp is row g + 8 (e / 2), column
// 8 j + 2 (lane % 4) + e % 2 of the warp's 16 rows. `accumulate` 0 overwrites d.
template <typename T, int N>
struct Wgmma;

// The accumulator operands of one wgmma: d[j][e] is register 4 j + e of its list.
#define BIGKERN_WGMMA_D4(d, j) "+f"(d[j][0]), "+f"(d[j][1]), "+f"(d[j][2]), "+f"(d[j][3])
#define BIGKERN_WGMMA_D_N64(d)                                                                        \
  BIGKERN_WGMMA_D4(d, 0), BIGKERN_WGMMA_D4(d, 1), BIGKERN_WGMMA_D4(d, 2), BIGKERN_WGMMA_D4(d, 3),     \
      BIGKERN_WGMMA_D4(d, 4), BIGKERN_WGMMA_D4(d, 5), BIGKERN_WGMMA_D4(d, 6), BIGKERN_WGMMA_D4(d, 7)
#define BIGKERN_WGMMA_D_N128(d)                                                                       \
  BIGKERN_WGMMA_D_N64(d), BIGKERN_WGMMA_D4(d, 8), BIGKERN_WGMMA_D4(d, 9), BIGKERN_WGMMA_D4(d, 10),     \
      BIGKERN_WGMMA_D4(d, 11), BIGKERN_WGMMA_D4(d, 12), BIGKERN_WGMMA_D4(d, 13), BIGKERN_WGMMA_D4(d, 14), \
      BIGKERN_WGMMA_D4(d, 15)
#define BIGKERN_WGMMA_REGISTERS_N64 \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define BIGKERN_WGMMA_REGISTERS_N128 \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"

// One specialisation: N columns (N / 2 accumulator registers per thread, operands %0 .. %(N/2 - 1));
// after them ss takes desc_a, desc_b (SS_DESCRIPTORS) and accumulate (SS_SCALE), rs takes a's four
// registers and desc_b (RS_OPERANDS) and accumulate (RS_SCALE). The trailing immediates are the
// scales of A and B (1, 1) and, for ss, both operands K-major (0, 0); rs's B is MN-major (1).
#define BIGKERN_WGMMA(T, N, PTX_TYPE, SS_DESCRIPTORS, SS_SCALE, RS_OPERANDS, RS_SCALE)                 \
  template <>                                                                                       \
  struct Wgmma<T, N> {                                                                              \
    /* d (64 x N per warpgroup, 16 rows per warp) (+)= A (smem, K-major) * B (smem, K-major) */      \
    static __device__ __forceinline__ void ss(float (&d)[N / 8][4], uint64_t desc_a, uint64_t desc_b, \
                                              int accumulate) {                                     \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " SS_SCALE ", 0;\n"                            \
                   "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." PTX_TYPE "." PTX_TYPE " "      \
                   BIGKERN_WGMMA_REGISTERS_N##N ", " SS_DESCRIPTORS ", p, 1, 1, 0, 0;\n}\n"          \
                   : BIGKERN_WGMMA_D_N##N(d)                                                        \
                   : "l"(desc_a), "l"(desc_b), "r"(accumulate));                                    \
    }                                                                                               \
    /* d (+)= A (registers, the mma.sync A fragment of each warp's 16 rows) * B (smem, MN-major) */  \
    static __device__ __forceinline__ void rs(float (&d)[N / 8][4], const uint32_t (&a)[4],          \
                                              uint64_t desc_b, int accumulate) {                    \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " RS_SCALE ", 0;\n"                            \
                   "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." PTX_TYPE "." PTX_TYPE " "      \
                   BIGKERN_WGMMA_REGISTERS_N##N ", " RS_OPERANDS ", p, 1, 1, 1;\n}\n"                \
                   : BIGKERN_WGMMA_D_N##N(d)                                                        \
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate));     \
    }                                                                                               \
  };

BIGKERN_WGMMA(__half, 64, "f16", "%32, %33", "%34", "{%32, %33, %34, %35}, %36", "%37")
BIGKERN_WGMMA(__nv_bfloat16, 64, "bf16", "%32, %33", "%34", "{%32, %33, %34, %35}, %36", "%37")
BIGKERN_WGMMA(__half, 128, "f16", "%64, %65", "%66", "{%64, %65, %66, %67}, %68", "%69")
BIGKERN_WGMMA(__nv_bfloat16, 128, "bf16", "%64, %65", "%66", "{%64, %65, %66, %67}, %68", "%69")

#undef BIGKERN_WGMMA
#undef BIGKERN_WGMMA_REGISTERS_N128
#undef BIGKERN_WGMMA_REGISTERS_N64
#undef BIGKERN_WGMMA_D_N128
#undef BIGKERN_WGMMA_D_N64
#undef BIGKERN_WGMMA_D4

// ---- register budget -----------------------------------------------------------------------------

template <int REGISTERS>
__device__ __forceinline__ void setmaxnreg_decrease() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(REGISTERS));
}

template <int REGISTERS>
__device__ __forceinline__ void setmaxnreg_increase() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(REGISTERS));
}

}  // namespace sm90
}  // namespace attention
}  // namespace bigkern
