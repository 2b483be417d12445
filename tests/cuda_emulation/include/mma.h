// The emulator's stand-in for CUDA's <mma.h> (nvcuda::wmma), enough for csrc/conv/igemm.cuh.
//
// WMMA leaves the distribution of a fragment's elements over the 32 threads of a warp unspecified,
// so a kernel may only touch fragment elements uniformly (x[t] for every t, as to_tf32 does). Here
// every thread holds the whole tile: load_matrix_sync reads all of it, mma_sync computes all of it
// (fp32 products and sums, as the tensor cores do), store_matrix_sync writes all of it -- the same
// values from each of the warp's threads. Wrong strides, a wrong pointer or a tile read before it
// was written therefore change the result here as they would on a GPU.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision {
struct tf32 {};
}  // namespace precision

// cvt.rna.tf32.f32: keep 10 mantissa bits, rounding to nearest with ties away from zero
inline float __float_to_tf32(float value) {
  if (!std::isfinite(value)) return value;
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  bits = (bits + 0x1000u) & 0xffffe000u;
  std::memcpy(&value, &bits, 4);
  return value;
}

namespace detail {
template <typename T>
struct storage {
  using type = T;
};
template <>
struct storage<precision::tf32> {
  using type = float;
};
inline float to_float(float v) { return v; }
inline float to_float(__half v) { return __half2float(v); }
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename Use, int M, int N, int K>
struct shape;  // rows x columns of the tile each operand holds
template <int M, int N, int K>
struct shape<matrix_a, M, N, K> {
  static constexpr int rows = M, cols = K;
};
template <int M, int N, int K>
struct shape<matrix_b, M, N, K> {
  static constexpr int rows = K, cols = N;
};
template <int M, int N, int K>
struct shape<accumulator, M, N, K> {
  static constexpr int rows = M, cols = N;
};
}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  using element_type = typename detail::storage<T>::type;
  static constexpr int rows = detail::shape<Use, M, N, K>::rows;
  static constexpr int cols = detail::shape<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols;
  element_type x[num_elements];  // row-major, the whole tile
};

template <typename Use, int M, int N, int K, typename T, typename Layout>
inline void fill_fragment(fragment<Use, M, N, K, T, Layout>& frag, typename fragment<Use, M, N, K, T, Layout>::element_type value) {
  for (int t = 0; t < frag.num_elements; ++t) frag.x[t] = value;
}

// Operand tiles: element (r, c) at ptr[r * ldm + c] (row_major) or ptr[c * ldm + r] (col_major).
template <typename Use, int M, int N, int K, typename T, typename Layout, typename P>
inline void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& frag, const P* ptr, unsigned ldm) {
  constexpr bool kRowMajor = std::is_same<Layout, row_major>::value;
  for (int r = 0; r < frag.rows; ++r)
    for (int c = 0; c < frag.cols; ++c)
      frag.x[r * frag.cols + c] = static_cast<typename fragment<Use, M, N, K, T, Layout>::element_type>(
          kRowMajor ? ptr[r * ldm + c] : ptr[c * ldm + r]);
}

template <int M, int N, int K, typename A, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, A, LA>& a,
                     const fragment<matrix_b, M, N, K, A, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  float out[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float sum = c.x[i * N + j];
      for (int k = 0; k < K; ++k) sum += detail::to_float(a.x[i * K + k]) * detail::to_float(b.x[k * N + j]);
      out[i * N + j] = sum;
    }
  std::memcpy(d.x, out, sizeof(out));
}

template <int M, int N, int K>
inline void store_matrix_sync(float* ptr, const fragment<accumulator, M, N, K, float>& frag, unsigned ldm,
                              layout_t layout) {
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) {
      float* out = layout == mem_row_major ? ptr + r * ldm + c : ptr + c * ldm + r;
      *out = frag.x[r * N + c];
    }
}

}  // namespace wmma
}  // namespace nvcuda
