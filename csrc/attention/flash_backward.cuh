// Flash attention backward for sm_80+ (mma.sync tensor cores, cp.async), deterministic.
//
// With x = q k^T * scale, P = softmax(x) recomputed from the saved lse as P = 2^(x log2(e) - lse log2(e)),
// and delta = rowsum(dO * O) (a small kernel before these):
//   dV = P^T dO        dP = dO V^T        dS = P * (dP - delta)        dQ = scale dS K        dK = scale dS^T Q
//
// Two kernels, no atomics, so every run gives the same bits:
//   dq kernel:   one CTA per (query block, query head, batch), warps owning 16 query rows; walks the
//                visible key blocks (double-buffered K and V) computing S, dP, dS and dQ += dS K.
//   dkdv kernel: one CTA per (key block, kv head, batch), warps owning 16 key rows; walks every query
//                head that reads this kv head and each of its visible query blocks (double-buffered
//                Q, dO, lse, delta), computing S^T = K Q^T and dP^T = V dO^T, so that P^T and dS^T are
//                already the register A operand of dV += P^T dO and dK += dS^T Q. Summing the GQA
//                group inside the CTA needs no reduction afterwards.
// This recomputes S and dP once more than FlashAttention-2's atomic dQ (7 products instead of 5).
// At head dim 256 the dK and dV accumulators do not fit in registers together: the dkdv kernel then
// runs twice, once for dV and once for dK.
#pragma once

#include "attention/flash_tiles.cuh"

namespace bigkern {
namespace attention {

template <int HEAD_DIM>
struct BackwardConfig;
// dq kernel: kDqWarps (BLOCK_M = 16 kDqWarps query rows), kDqBlockN keys per step.
// dkdv kernel: kKvWarps (BLOCK_N = 16 kKvWarps key rows), kKvBlockM queries per step; kSplitDkDv.
template <> struct BackwardConfig<32> {
  static constexpr int kDqWarps = 4, kDqBlockN = 64, kKvWarps = 4, kKvBlockM = 64;
  static constexpr bool kSplitDkDv = false;
};
template <> struct BackwardConfig<64> {
  static constexpr int kDqWarps = 4, kDqBlockN = 64, kKvWarps = 8, kKvBlockM = 64;
  static constexpr bool kSplitDkDv = false;
};
template <> struct BackwardConfig<96> {
  static constexpr int kDqWarps = 4, kDqBlockN = 64, kKvWarps = 4, kKvBlockM = 32;
  static constexpr bool kSplitDkDv = false;
};
template <> struct BackwardConfig<128> {
  static constexpr int kDqWarps = 4, kDqBlockN = 64, kKvWarps = 4, kKvBlockM = 32;
  static constexpr bool kSplitDkDv = false;
};
template <> struct BackwardConfig<256> {
  static constexpr int kDqWarps = 4, kDqBlockN = 32, kKvWarps = 4, kKvBlockM = 32;
  static constexpr bool kSplitDkDv = true;
};

template <typename T, int D, int WARPS, int BLOCK_N>
__global__ void __launch_bounds__(WARPS * 32)
flash_backward_dq_kernel(const AttentionProblem problem, const AttentionBackwardArgs args) {
  constexpr int kThreads = WARPS * 32;
  constexpr int kBlockM = WARPS * 16;
  constexpr int kStride = kTileStride<D>;
  extern __shared__ __align__(16) unsigned char shared_raw[];
  T* q_tile = reinterpret_cast<T*>(shared_raw);  // kBlockM rows
  T* do_tile = q_tile + kBlockM * kStride;        // kBlockM rows
  T* k_tiles = do_tile + kBlockM * kStride;       // 2 stages of BLOCK_N rows
  T* v_tiles = k_tiles + 2 * BLOCK_N * kStride;   // 2 stages of BLOCK_N rows

  const int m_block = gridDim.x - 1 - blockIdx.x;  // heaviest blocks first under a causal mask
  const int head = blockIdx.y;
  const int batch = blockIdx.z;
  const int kv_head = head / (problem.heads_q / problem.heads_kv);
  const int m0 = m_block * kBlockM;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int warp_row0 = m0 + warp * 16;

  const T* q = head_pointer<T>(args.q, batch, head) + m0 * args.q.row_stride;
  const T* grad_out = head_pointer<T>(args.grad_out, batch, head) + m0 * args.grad_out.row_stride;
  KeyBlockWalk<T, D, BLOCK_N, kThreads> keys(k_tiles, v_tiles, problem, args.k, args.v, batch, kv_head,
                                               m0 + kBlockM);
  load_tile_async<kBlockM, D, kThreads>(q_tile, q, args.q.row_stride, problem.len_q - m0);
  load_tile_async<kBlockM, D, kThreads>(do_tile, grad_out, args.grad_out.row_stride, problem.len_q - m0);
  keys.start();

  // lse (in log2 units) and delta of this lane's two rows; rows past the end get 0 (never stored)
  float lse2[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = warp_row0 + acc_row(lane, 2 * r);
    const int64_t index = (int64_t(batch) * problem.heads_q + head) * problem.len_q + row;
    lse2[r] = row < problem.len_q ? args.lse[index] * kLog2e : 0.f;
    delta[r] = row < problem.len_q ? args.delta[index] : 0.f;
  }

  const float scale_log2 = problem.scale * kLog2e;
  float dq[D / 8][4];
  zero(dq);
  const T* q_warp = q_tile + warp * 16 * kStride;
  const T* do_warp = do_tile + warp * 16 * kStride;

  keys.walk([&](int n_block, const T* k_tile, const T* v_tile) {
    float s[BLOCK_N / 8][4];
    zero(s);
    warp_gemm_abt<T, BLOCK_N, D, kStride, kStride>(s, q_warp, k_tile, lane);
    float dp[BLOCK_N / 8][4];
    zero(dp);
    warp_gemm_abt<T, BLOCK_N, D, kStride, kStride>(dp, do_warp, v_tile, lane);

    const int n0 = n_block * BLOCK_N;
    const bool masked_block =
        n0 + BLOCK_N > problem.len_kv || (problem.causal && n0 + BLOCK_N - 1 > warp_row0);
#pragma unroll
    for (int j = 0; j < BLOCK_N / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        bool visible = true;
        if (masked_block) {
          const int key = n0 + acc_col(lane, j, e);
          const int query = warp_row0 + acc_row(lane, e);
          visible = key < problem.len_kv && !(problem.causal && key > query);
        }
        const float p = visible ? fast_exp2(s[j][e] * scale_log2 - lse2[e / 2]) : 0.f;
        s[j][e] = p * (dp[j][e] - delta[e / 2]);  // dS, without the softmax scale
      }
    }
    warp_gemm_rb<T, D, BLOCK_N, kStride>(dq, s, k_tile, lane);
  });

  T* dq_out = head_pointer_mut<T>(args.dq, batch, head) + int64_t(warp_row0) * args.dq.row_stride;
  store_rows<T, D>(dq_out, args.dq.row_stride, dq, problem.scale, problem.scale, problem.len_q - warp_row0, lane);
}

template <typename T, int D, int WARPS, int BLOCK_M, bool DO_DK, bool DO_DV>
__global__ void __launch_bounds__(WARPS * 32)
flash_backward_dkdv_kernel(const AttentionProblem problem, const AttentionBackwardArgs args) {
  constexpr int kThreads = WARPS * 32;
  constexpr int kBlockN = WARPS * 16;
  constexpr int kStride = kTileStride<D>;
  extern __shared__ __align__(16) unsigned char shared_raw[];
  T* k_tile = reinterpret_cast<T*>(shared_raw);      // kBlockN rows
  T* v_tile = k_tile + kBlockN * kStride;             // kBlockN rows
  T* q_tiles = v_tile + kBlockN * kStride;            // 2 stages of BLOCK_M rows
  T* do_tiles = q_tiles + 2 * BLOCK_M * kStride;      // 2 stages of BLOCK_M rows
  float* lse_tiles = reinterpret_cast<float*>(do_tiles + 2 * BLOCK_M * kStride);  // 2 x BLOCK_M, log2 units
  float* delta_tiles = lse_tiles + 2 * BLOCK_M;                                   // 2 x BLOCK_M

  const int n_block = blockIdx.x;  // low key blocks are the heaviest under a causal mask: first
  const int kv_head = blockIdx.y;
  const int batch = blockIdx.z;
  const int group = problem.heads_q / problem.heads_kv;
  const int n0 = n_block * kBlockN;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int warp_key0 = n0 + warp * 16;  // first key row of this warp

  const T* k = head_pointer<T>(args.k, batch, kv_head) + n0 * args.k.row_stride;
  const T* v = head_pointer<T>(args.v, batch, kv_head) + n0 * args.v.row_stride;

  // query blocks that see a key of this block: all, or under the causal mask those with a row >= n0
  const int m_first = problem.causal ? n0 / BLOCK_M : 0;
  const int m_count = max(0, (problem.len_q + BLOCK_M - 1) / BLOCK_M - m_first);
  const int steps = group * m_count;  // (query head, query block) pairs, head-major

  auto load_q_block = [&](int step, int stage) {
    const int head = kv_head * group + step / m_count;
    const int m0 = (m_first + step % m_count) * BLOCK_M;
    const T* q = head_pointer<T>(args.q, batch, head) + m0 * args.q.row_stride;
    const T* grad_out = head_pointer<T>(args.grad_out, batch, head) + m0 * args.grad_out.row_stride;
    load_tile_async<BLOCK_M, D, kThreads>(q_tiles + stage * BLOCK_M * kStride, q, args.q.row_stride,
                                          problem.len_q - m0);
    load_tile_async<BLOCK_M, D, kThreads>(do_tiles + stage * BLOCK_M * kStride, grad_out,
                                          args.grad_out.row_stride, problem.len_q - m0);
    const int64_t row_index0 = (int64_t(batch) * problem.heads_q + head) * problem.len_q + m0;
    for (int i = threadIdx.x; i < BLOCK_M; i += kThreads) {
      const bool valid = m0 + i < problem.len_q;
      lse_tiles[stage * BLOCK_M + i] = valid ? args.lse[row_index0 + i] * kLog2e : 0.f;
      delta_tiles[stage * BLOCK_M + i] = valid ? args.delta[row_index0 + i] : 0.f;
    }
  };

  load_tile_async<kBlockN, D, kThreads>(k_tile, k, args.k.row_stride, problem.len_kv - n0);
  load_tile_async<kBlockN, D, kThreads>(v_tile, v, args.v.row_stride, problem.len_kv - n0);
  if (steps > 0) load_q_block(0, 0);
  cp_async_commit();

  const float scale_log2 = problem.scale * kLog2e;
  float dk[D / 8][4];
  float dv[D / 8][4];
  zero(dk);
  zero(dv);
  const T* k_warp = k_tile + warp * 16 * kStride;
  const T* v_warp = v_tile + warp * 16 * kStride;

  for (int step = 0; step < steps; ++step) {
    const int stage = step % 2;
    if (step + 1 < steps) load_q_block(step + 1, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const T* q_tile = q_tiles + stage * BLOCK_M * kStride;
    const T* do_tile = do_tiles + stage * BLOCK_M * kStride;
    const float* lse2 = lse_tiles + stage * BLOCK_M;
    const float* delta = delta_tiles + stage * BLOCK_M;
    const int m0 = (m_first + step % m_count) * BLOCK_M;

    // S^T: rows are this warp's keys, columns the block's queries
    float p[BLOCK_M / 8][4];
    zero(p);
    warp_gemm_abt<T, BLOCK_M, D, kStride, kStride>(p, k_warp, q_tile, lane);
    const bool masked_block = m0 + BLOCK_M > problem.len_q || n0 + kBlockN > problem.len_kv ||
                              (problem.causal && warp_key0 + 15 > m0);
#pragma unroll
    for (int j = 0; j < BLOCK_M / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int column = acc_col(lane, j, e);
        bool visible = true;
        if (masked_block) {
          const int key = warp_key0 + acc_row(lane, e);
          const int query = m0 + column;
          visible = query < problem.len_q && key < problem.len_kv && !(problem.causal && key > query);
        }
        p[j][e] = visible ? fast_exp2(p[j][e] * scale_log2 - lse2[column]) : 0.f;
      }
    }
    if constexpr (DO_DV) warp_gemm_rb<T, D, BLOCK_M, kStride>(dv, p, do_tile, lane);
    if constexpr (DO_DK) {
      float dp[BLOCK_M / 8][4];
      zero(dp);
      warp_gemm_abt<T, BLOCK_M, D, kStride, kStride>(dp, v_warp, do_tile, lane);
#pragma unroll
      for (int j = 0; j < BLOCK_M / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) p[j][e] *= dp[j][e] - delta[acc_col(lane, j, e)];  // dS^T
      warp_gemm_rb<T, D, BLOCK_M, kStride>(dk, p, q_tile, lane);
    }
    __syncthreads();  // every warp is done with this stage before it is refilled
  }
  cp_async_wait<0>();  // nothing left in flight at exit (the last group is empty, or the only one unused)

  const int valid_keys = problem.len_kv - warp_key0;
  if constexpr (DO_DK) {
    T* dk_out = head_pointer_mut<T>(args.dk, batch, kv_head) + int64_t(warp_key0) * args.dk.row_stride;
    store_rows<T, D>(dk_out, args.dk.row_stride, dk, problem.scale, problem.scale, valid_keys, lane);
  }
  if constexpr (DO_DV) {
    T* dv_out = head_pointer_mut<T>(args.dv, batch, kv_head) + int64_t(warp_key0) * args.dv.row_stride;
    store_rows<T, D>(dv_out, args.dv.row_stride, dv, 1.f, 1.f, valid_keys, lane);
  }
}

template <typename T, int D>
cudaError_t launch_backward(const AttentionProblem& problem, const AttentionBackwardArgs& args,
                            cudaStream_t stream) {
  using Config = BackwardConfig<D>;
  constexpr int kStride = kTileStride<D>;

  constexpr int kDqBlockM = Config::kDqWarps * 16;
  constexpr size_t kDqSmem = size_t(2 * kDqBlockM + 4 * Config::kDqBlockN) * kStride * sizeof(T);
  const dim3 dq_grid((problem.len_q + kDqBlockM - 1) / kDqBlockM, problem.heads_q, problem.batch);
  cudaError_t error = launch(flash_backward_dq_kernel<T, D, Config::kDqWarps, Config::kDqBlockN>, dq_grid,
                             Config::kDqWarps * 32, kDqSmem, stream, problem, args);
  if (error != cudaSuccess) return error;

  constexpr int kKvBlockN = Config::kKvWarps * 16;
  constexpr int kKvBlockM = Config::kKvBlockM;
  constexpr size_t kKvSmem = size_t(2 * kKvBlockN + 4 * kKvBlockM) * kStride * sizeof(T) +
                             4 * kKvBlockM * sizeof(float);
  const dim3 kv_grid((problem.len_kv + kKvBlockN - 1) / kKvBlockN, problem.heads_kv, problem.batch);
  constexpr int kKvThreads = Config::kKvWarps * 32;
  if constexpr (Config::kSplitDkDv) {
    error = launch(flash_backward_dkdv_kernel<T, D, Config::kKvWarps, kKvBlockM, false, true>, kv_grid,
                   kKvThreads, kKvSmem, stream, problem, args);
    if (error != cudaSuccess) return error;
    return launch(flash_backward_dkdv_kernel<T, D, Config::kKvWarps, kKvBlockM, true, false>, kv_grid, kKvThreads,
                  kKvSmem, stream, problem, args);
  } else {
    return launch(flash_backward_dkdv_kernel<T, D, Config::kKvWarps, kKvBlockM, true, true>, kv_grid, kKvThreads,
                  kKvSmem, stream, problem, args);
  }
}

// Instantiated once per head dim, each in its own translation unit (attention_backward_hdim*.cu).
template <int HEAD_DIM>
cudaError_t backward_for_head_dim(DType dtype, const AttentionProblem& problem, const AttentionBackwardArgs& args,
                                  cudaStream_t stream) {
  cudaError_t error = cudaErrorInvalidValue;
  dispatch_half_types(dtype, [&](auto element) {
    error = launch_backward<decltype(element), HEAD_DIM>(problem, args, stream);
  });
  return error;
}

}  // namespace attention
}  // namespace bigkern
