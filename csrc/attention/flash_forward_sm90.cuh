// Flash attention forward for Hopper (sm_90a): TMA loads, wgmma, a producer warpgroup and two
// consumer warpgroups (FlashAttention-3's structure, without its intra-warpgroup overlap of softmax
// and products, yet).
//
// One CTA of 384 threads per (block of 128 query rows, query head, batch):
//   warpgroup 0, the producer: one thread issues TMA copies, Q once, then K and V of each visible
//     key block (last to first, as the consumers take them) into a 2-stage ring; "full" mbarriers
//     count the bytes in, "empty" mbarriers (one arrival per consumer warp) say a stage is free.
//     It gives its registers away (setmaxnreg) to the consumers.
//   warpgroups 1 and 2, the consumers: 64 query rows each. S = Q K^T by wgmma with both operands in
//     shared memory; masking and the online softmax exactly as the sm_80 kernel (ForwardRows, the
//     accumulators have the same layout); O += P V by wgmma with P from registers.
// Shared-memory tiles are what TMA writes with 128-byte swizzling: per 64-column chunk of the head
// dim, rows of 128 bytes, 8-row groups of 1024 bytes (descriptors in tensor_core_sm90.cuh).
//
// Host side: one 4-d tensor map per operand (head dim, then rows, heads and batches ordered by
// stride, so that views of a fused QKV projection are read in place). Whenever a map cannot be made
// (strides TMA cannot express, empty sequences), the caller falls back to the sm_80 kernel.
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "attention/flash_forward.cuh"
#include "attention/tensor_core_sm90.cuh"
#include "attention/tensor_map.cuh"

namespace bigkern {
namespace attention {
namespace sm90 {

constexpr int kStages = 2;
constexpr int kBlockM = 128;   // two consumer warpgroups of 64 rows
constexpr int kBlockN = 128;   // keys per stage
constexpr int kThreads = 384;  // producer warpgroup + 2 consumer warpgroups
constexpr int kChunk = 64;     // head-dim columns per 128-byte swizzled row

// An operand as TMA sees it: its tensor map, and which tensor-map dimension (1..3) holds the rows,
// the heads and the batches (dimension 0 is the head dim).
struct TmaOperand {
  CUtensorMap map;
  int dim_of_row;
  int dim_of_head;
  int dim_of_batch;
};

struct ForwardParams {
  TmaOperand q, k, v;
  AttentionProblem problem;
  AttentionForwardArgs args;
};

template <int D>
struct SharedLayout {
  static_assert(D % kChunk == 0, "the sm90 path takes head dims that are multiples of 64");
  static constexpr int kChunks = D / kChunk;
  static constexpr int kQBytes = kChunks * kBlockM * 128;
  static constexpr int kStageBytes = kChunks * kBlockN * 128;  // one K or V stage
  static constexpr int kQ = 0;
  static constexpr int kK = kQ + kQBytes;
  static constexpr int kV = kK + kStages * kStageBytes;
  static constexpr int kBarriers = kV + kStages * kStageBytes;
  static constexpr int kBytes = kBarriers + (1 + 2 * kStages) * 8 + 1024;  // + slack to align to 1024
};

// A shared-memory matrix descriptor for the 128-byte-swizzled layouts TMA writes with
// CU_TENSOR_MAP_SWIZZLE_128B (16-byte chunk c of 128-byte row r stored at chunk c ^ (r % 8), rows
// in 1024-byte groups of 8). Offsets in bytes; the hardware drops their low 4 bits.
//   K-major (rows of 64 elements along K): leading offset unused, stride offset = 1024 (8 rows).
//   MN-major (rows of 64 elements along M/N, one per K index): leading offset = from one 64-wide
//   chunk of M/N to the next, stride offset = 1024 (8 K indices).
__device__ __forceinline__ uint64_t smem_descriptor(const void* smem, uint32_t leading_bytes, uint32_t stride_bytes) {
  const uint64_t encode_mask = 0x3FFFF;
  return ((uint64_t(shared_address(smem)) & encode_mask) >> 4) | (((leading_bytes & encode_mask) >> 4) << 16) |
         (((uint64_t(stride_bytes) & encode_mask) >> 4) << 32) | (uint64_t(1) << 62);  // 1 = 128-byte swizzle
}

__device__ __forceinline__ void load_box(void* smem, const TmaOperand& operand, uint64_t* barrier, int column,
                                         int row, int head, int batch) {
  int coordinates[4] = {column, 0, 0, 0};
  coordinates[operand.dim_of_row] = row;
  coordinates[operand.dim_of_head] = head;
  coordinates[operand.dim_of_batch] = batch;
  tma_load_4d(smem, &operand.map, barrier, coordinates[0], coordinates[1], coordinates[2], coordinates[3]);
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) flash_forward_sm90_kernel(const __grid_constant__ ForwardParams params) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Layout = SharedLayout<D>;
  extern __shared__ __align__(1024) unsigned char shared_raw[];
  // swizzled tiles must start on 1024-byte boundaries of the shared window
  const uint32_t misalignment = shared_address(shared_raw) % 1024;
  unsigned char* base = shared_raw + (misalignment ? 1024 - misalignment : 0);
  unsigned char* q_tile = base + Layout::kQ;
  unsigned char* k_tiles = base + Layout::kK;
  unsigned char* v_tiles = base + Layout::kV;
  uint64_t* q_full = reinterpret_cast<uint64_t*>(base + Layout::kBarriers);
  uint64_t* kv_full = q_full + 1;            // kStages
  uint64_t* kv_empty = kv_full + kStages;    // kStages

  const AttentionProblem& problem = params.problem;
  const int m_block = gridDim.x - 1 - blockIdx.x;  // heaviest (causal) blocks first
  const int head = blockIdx.y;
  const int batch = blockIdx.z;
  const int kv_head = head / (problem.heads_q / problem.heads_kv);
  const int m0 = m_block * kBlockM;
  const int n_end = problem.causal ? min(problem.len_kv, m0 + kBlockM) : problem.len_kv;
  const int n_blocks = (n_end + kBlockN - 1) / kBlockN;

  if (threadIdx.x == 0) {
    mbarrier_init(q_full, 1);
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(&kv_full[s], 1);
      mbarrier_init(&kv_empty[s], 8);  // every consumer warp releases the stage
    }
    fence_barrier_init();
  }
  __syncthreads();

  const int warpgroup = threadIdx.x / 128;
  if (warpgroup == 0) {
    setmaxnreg_decrease<24>();
    if (threadIdx.x == 0) {
      mbarrier_arrive_expect_tx(q_full, Layout::kQBytes);
      for (int c = 0; c < Layout::kChunks; ++c)
        load_box(q_tile + c * kBlockM * 128, params.q, q_full, c * kChunk, m0, head, batch);
      for (int it = 0; it < n_blocks; ++it) {
        const int stage = it % kStages;
        // the stage's previous use (it - kStages) must be released by every consumer warp
        if (it >= kStages) mbarrier_wait(&kv_empty[stage], (it / kStages - 1) % 2);
        mbarrier_arrive_expect_tx(&kv_full[stage], 2 * Layout::kStageBytes);
        const int n0 = (n_blocks - 1 - it) * kBlockN;
        for (int c = 0; c < Layout::kChunks; ++c) {
          load_box(k_tiles + stage * Layout::kStageBytes + c * kBlockN * 128, params.k, &kv_full[stage], c * kChunk,
                   n0, kv_head, batch);
          load_box(v_tiles + stage * Layout::kStageBytes + c * kBlockN * 128, params.v, &kv_full[stage], c * kChunk,
                   n0, kv_head, batch);
        }
      }
    }
    return;
  }

  setmaxnreg_increase<240>();
  const int consumer = warpgroup - 1;
  const int warp = (threadIdx.x / 32) % 4;
  const int lane = threadIdx.x % 32;
  ForwardRows<D, kBlockN> rows(problem, m0 + consumer * 64 + warp * 16);
  const unsigned char* q_rows = q_tile + consumer * 64 * 128;  // this warpgroup's rows in each chunk
  mbarrier_wait(q_full, 0);

  for (int it = 0; it < n_blocks; ++it) {
    const int stage = it % kStages;
    mbarrier_wait(&kv_full[stage], (it / kStages) % 2);
    const unsigned char* k_stage = k_tiles + stage * Layout::kStageBytes;
    const unsigned char* v_stage = v_tiles + stage * Layout::kStageBytes;

    // S = Q K^T: K-major A and B, k16 steps walk 32 bytes along a 128-byte row, then the next chunk
    float s[kBlockN / 8][4];
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const int chunk = kk / 4, offset = (kk % 4) * 32;
      const uint64_t a = smem_descriptor(q_rows + chunk * kBlockM * 128 + offset, 16, 1024);
      const uint64_t b = smem_descriptor(k_stage + chunk * kBlockN * 128 + offset, 16, 1024);
      Wgmma<T, kBlockN>::ss(s, a, b, kk > 0);
    }
    wgmma_commit();
    wgmma_wait<0>();

    rows.softmax_step(s, (n_blocks - 1 - it) * kBlockN, problem, lane);

    // O += P V: P from registers (all packed first, so no register changes between the wgmmas);
    // V MN-major, k16 steps walk 16 key rows (2048 bytes), the head dim spans chunks kBlockN * 128
    // bytes apart
    uint32_t p[kBlockN / 16][4];
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) a_fragment<T, kBlockN>(p[kk], s, kk * 16);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      const uint64_t b = smem_descriptor(v_stage + kk * 16 * 128, kBlockN * 128, 1024);
      Wgmma<T, D>::rs(rows.o, p[kk], b, 1);
    }
    wgmma_commit();
    wgmma_wait<0>();
    if (lane == 0) mbarrier_arrive(&kv_empty[stage]);
  }

  rows.template finish<T>(problem, params.args, batch, head, lane);
#else
  __trap();  // built without sm_90a: the host never selects this kernel then (see forward_sm90)
#endif
}

// ---- host side ---------------------------------------------------------------------------------

// The tensor map of one operand (batch, heads, rows, D): boxes of 64 head-dim columns by box_rows
// rows. False when TMA cannot describe it (the caller then uses the sm_80 kernel).
inline bool make_operand(TmaOperand& operand, DType dtype, const AttentionTensor& t, int batch, int heads, int rows,
                         int head_dim, int box_rows) {
  const PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
  if (encode == nullptr || batch <= 0 || heads <= 0 || rows <= 0) return false;
  struct Dim {
    int64_t size, stride;
    int which;  // 0 rows, 1 heads, 2 batches
  };
  Dim dims[3] = {{rows, t.row_stride, 0}, {heads, t.head_stride, 1}, {batch, t.batch_stride, 2}};
  // a dimension of size 1 has no real stride: put it outermost, with one that nests
  std::stable_sort(dims, dims + 3, [](const Dim& a, const Dim& b) {
    return (a.size == 1) != (b.size == 1) ? b.size == 1 : a.stride < b.stride;
  });
  int64_t extent = head_dim;  // elements spanned by the dimensions inside this one
  cuuint64_t global_dim[4] = {cuuint64_t(head_dim), 0, 0, 0};
  cuuint64_t global_stride[3];
  cuuint32_t box[4] = {cuuint32_t(kChunk), 1, 1, 1};
  for (int i = 0; i < 3; ++i) {
    int64_t stride = dims[i].size == 1 ? extent : dims[i].stride;
    if (stride < extent || stride % 8 != 0) return false;  // overlapping, or not in 16-byte steps
    global_dim[i + 1] = cuuint64_t(dims[i].size);
    global_stride[i] = cuuint64_t(stride) * 2;
    extent = stride * dims[i].size;
    if (dims[i].which == 0) {
      box[i + 1] = cuuint32_t(box_rows);
      operand.dim_of_row = i + 1;
    } else if (dims[i].which == 1) {
      operand.dim_of_head = i + 1;
    } else {
      operand.dim_of_batch = i + 1;
    }
  }
  const cuuint32_t element_strides[4] = {1, 1, 1, 1};
  const CUresult result = encode(
      &operand.map, dtype == DType::kBFloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 4,
      t.data, global_dim, global_stride, box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
      CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return result == CUDA_SUCCESS;
}

// cudaErrorNotSupported when the tensor maps cannot be made (the caller falls back).
template <typename T, int D>
cudaError_t launch_forward(DType dtype, const AttentionProblem& problem, const AttentionForwardArgs& args,
                           cudaStream_t stream) {
  ForwardParams params;
  std::memset(&params, 0, sizeof(params));
  params.problem = problem;
  params.args = args;
  if (!make_operand(params.q, dtype, args.q, problem.batch, problem.heads_q, problem.len_q, D, kBlockM) ||
      !make_operand(params.k, dtype, args.k, problem.batch, problem.heads_kv, problem.len_kv, D, kBlockN) ||
      !make_operand(params.v, dtype, args.v, problem.batch, problem.heads_kv, problem.len_kv, D, kBlockN))
    return cudaErrorNotSupported;
  const dim3 grid((problem.len_q + kBlockM - 1) / kBlockM, problem.heads_q, problem.batch);
  return launch(flash_forward_sm90_kernel<T, D>, grid, kThreads, SharedLayout<D>::kBytes, stream, params);
}

// Instantiated once per head dim, each in its own translation unit (attention_sm90_forward_hdim*.cu).
template <int HEAD_DIM>
cudaError_t forward_for_head_dim(DType dtype, const AttentionProblem& problem, const AttentionForwardArgs& args,
                                 cudaStream_t stream) {
  cudaError_t error = cudaErrorInvalidValue;
  dispatch_half_types(dtype, [&](auto element) {
    error = launch_forward<decltype(element), HEAD_DIM>(dtype, problem, args, stream);
  });
  return error;
}

}  // namespace sm90
}  // namespace attention
}  // namespace bigkern
