// Flash attention forward for sm_80+ (mma.sync tensor cores, cp.async), FlashAttention-2's schedule.
//
// One CTA per (block of BLOCK_M query rows, query head, batch); each of its warps owns 16 query
// rows. The CTA walks the key/value blocks of its kv head from the last visible one down to the
// first, with the next block's K and V copied (cp.async) into the other of two shared-memory stages
// while this one is used. For each block, per warp:
//   S = Q K^T                          (fp32, 16 x BLOCK_N)
//   x = S * scale * log2(e), masked entries -inf (only in blocks that cross the edge or the diagonal)
//   m' = max(m, rowmax x);  P = 2^(x - m');  l = l 2^(m - m') + rowsum P;  O = O 2^(m - m') + P V
// and at the end out = O / l, lse = (m + log2 l) ln 2. A row that sees no key keeps l = 0 and
// gets out = 0, lse = -inf (a fully-masked row uses 0 in place of m = -inf, so no inf - inf arises).
#pragma once

#include "attention/flash_tiles.cuh"

namespace bigkern {
namespace attention {

template <int HEAD_DIM>
struct ForwardConfig;
// (warps, BLOCK_N): BLOCK_M = 16 warps. Shared memory is (BLOCK_M + 4 BLOCK_N) padded rows.
template <> struct ForwardConfig<32> { static constexpr int kWarps = 4, kBlockN = 64; };
template <> struct ForwardConfig<64> { static constexpr int kWarps = 8, kBlockN = 64; };
template <> struct ForwardConfig<96> { static constexpr int kWarps = 8, kBlockN = 64; };
template <> struct ForwardConfig<128> { static constexpr int kWarps = 8, kBlockN = 64; };
template <> struct ForwardConfig<256> { static constexpr int kWarps = 4, kBlockN = 32; };

// The running state of one warp's 16 query rows, shared by the sm_80 and the sm_90 forward kernels
// (both hold S and O in the accumulator layout of flash_tiles.cuh).
template <int D, int BLOCK_N>
struct ForwardRows {
  float o[D / 8][4];
  float row_max[2];  // per accumulator row (g and g + 8), in log2 units of the scaled scores
  float row_sum[2];  // this lane's part; the quad's parts are added in finish()
  float scale_log2;
  int warp_row0;  // first query row of the warp

  __device__ __forceinline__ ForwardRows(const AttentionProblem& problem, int first_row)
      : row_max{-kInf, -kInf}, row_sum{0.f, 0.f}, scale_log2(problem.scale * kLog2e), warp_row0(first_row) {
    zero(o);
  }

  // Scores S (16 x BLOCK_N, keys n0..) -> probabilities P in place, with O and l rescaled to the new
  // row maxima. Masks only blocks that pass the end of the keys or hold a key after this warp's
  // first row (the diagonal). A row with no visible key so far uses 0 for its max (no inf - inf).
  __device__ __forceinline__ void softmax_step(float (&s)[BLOCK_N / 8][4], int n0, const AttentionProblem& problem,
                                               int lane) {
    const bool masked_block =
        n0 + BLOCK_N > problem.len_kv || (problem.causal && n0 + BLOCK_N - 1 > warp_row0);
#pragma unroll
    for (int j = 0; j < BLOCK_N / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[j][e] * scale_log2;
        if (masked_block) {
          const int key = n0 + acc_col(lane, j, e);
          const int query = warp_row0 + acc_row(lane, e);
          if (key >= problem.len_kv || (problem.causal && key > query)) x = -kInf;
        }
        s[j][e] = x;
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float block_max = row_max[r];
#pragma unroll
      for (int j = 0; j < BLOCK_N / 8; ++j) block_max = fmaxf(block_max, fmaxf(s[j][2 * r], s[j][2 * r + 1]));
      block_max = quad_max(block_max);
      const float m_use = block_max == -kInf ? 0.f : block_max;
      const float correction = fast_exp2(row_max[r] - m_use);  // 0 while the row had no key yet
      row_max[r] = block_max;
      float sum = row_sum[r] * correction;
#pragma unroll
      for (int j = 0; j < BLOCK_N / 8; ++j) {
        s[j][2 * r] = fast_exp2(s[j][2 * r] - m_use);
        s[j][2 * r + 1] = fast_exp2(s[j][2 * r + 1] - m_use);
        sum += s[j][2 * r] + s[j][2 * r + 1];
      }
      row_sum[r] = sum;
#pragma unroll
      for (int d = 0; d < D / 8; ++d) {
        o[d][2 * r] *= correction;
        o[d][2 * r + 1] *= correction;
      }
    }
  }

  // out = O / l and lse = (m + log2 l) ln 2 for this warp's rows; a row that saw no key gets out = 0,
  // lse = -inf (and NaN stays NaN).
  template <typename T>
  __device__ __forceinline__ void finish(const AttentionProblem& problem, const AttentionForwardArgs& args, int batch,
                                         int head, int lane) {
    float inv_sum[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float sum = quad_sum(row_sum[r]);
      inv_sum[r] = sum == 0.f ? 0.f : 1.f / sum;
      const int row = warp_row0 + acc_row(lane, 2 * r);
      if (lane % 4 == 0 && row < problem.len_q) {
        const int64_t lse_index = (int64_t(batch) * problem.heads_q + head) * problem.len_q + row;
        args.lse[lse_index] = sum == 0.f ? -kInf : (row_max[r] + log2f(sum)) * kLn2;
      }
    }
    T* out = head_pointer_mut<T>(args.out, batch, head) + int64_t(warp_row0) * args.out.row_stride;
    store_rows<T, D>(out, args.out.row_stride, o, inv_sum[0], inv_sum[1], problem.len_q - warp_row0, lane);
  }
};

template <typename T, int D, int WARPS, int BLOCK_N>
__global__ void __launch_bounds__(WARPS * 32)
flash_forward_kernel(const AttentionProblem problem, const AttentionForwardArgs args) {
  constexpr int kThreads = WARPS * 32;
  constexpr int kBlockM = WARPS * 16;
  constexpr int kStride = kTileStride<D>;
  extern __shared__ __align__(16) unsigned char shared_raw[];
  T* q_tile = reinterpret_cast<T*>(shared_raw);  // kBlockM rows
  T* k_tiles = q_tile + kBlockM * kStride;        // 2 stages of BLOCK_N rows
  T* v_tiles = k_tiles + 2 * BLOCK_N * kStride;   // 2 stages of BLOCK_N rows

  // the heaviest query blocks (most keys under a causal mask) start first
  const int m_block = gridDim.x - 1 - blockIdx.x;
  const int head = blockIdx.y;
  const int batch = blockIdx.z;
  const int kv_head = head / (problem.heads_q / problem.heads_kv);
  const int m0 = m_block * kBlockM;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int warp_row0 = m0 + warp * 16;  // first query row of this warp

  const T* q = head_pointer<T>(args.q, batch, head) + m0 * args.q.row_stride;
  KeyBlockWalk<T, D, BLOCK_N, kThreads> keys(k_tiles, v_tiles, problem, args.k, args.v, batch, kv_head,
                                               m0 + kBlockM);
  load_tile_async<kBlockM, D, kThreads>(q_tile, q, args.q.row_stride, problem.len_q - m0);
  keys.start();

  ForwardRows<D, BLOCK_N> rows(problem, warp_row0);
  const T* q_warp = q_tile + warp * 16 * kStride;

  keys.walk([&](int n_block, const T* k_tile, const T* v_tile) {
    float s[BLOCK_N / 8][4];
    zero(s);
    warp_gemm_abt<T, BLOCK_N, D, kStride, kStride>(s, q_warp, k_tile, lane);
    rows.softmax_step(s, n_block * BLOCK_N, problem, lane);
    warp_gemm_rb<T, D, BLOCK_N, kStride>(rows.o, s, v_tile, lane);
  });

  rows.template finish<T>(problem, args, batch, head, lane);
}

template <typename T, int D>
cudaError_t launch_forward(const AttentionProblem& problem, const AttentionForwardArgs& args, cudaStream_t stream) {
  using Config = ForwardConfig<D>;
  constexpr int kBlockM = Config::kWarps * 16;
  constexpr size_t kSmem = size_t(kBlockM + 4 * Config::kBlockN) * kTileStride<D> * sizeof(T);
  const dim3 grid((problem.len_q + kBlockM - 1) / kBlockM, problem.heads_q, problem.batch);
  return launch(flash_forward_kernel<T, D, Config::kWarps, Config::kBlockN>, grid, Config::kWarps * 32, kSmem,
                stream, problem, args);
}

// Instantiated once per head dim, each in its own translation unit (attention_forward_hdim*.cu).
template <int HEAD_DIM>
cudaError_t forward_for_head_dim(DType dtype, const AttentionProblem& problem, const AttentionForwardArgs& args,
                                 cudaStream_t stream) {
  cudaError_t error = cudaErrorInvalidValue;
  dispatch_half_types(dtype, [&](auto element) {
    error = launch_forward<decltype(element), HEAD_DIM>(problem, args, stream);
  });
  return error;
}

}  // namespace attention
}  // namespace bigkern
