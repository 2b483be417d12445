// The emulator's stand-in for csrc/attention/tensor_map.cuh: an encoder with the signature of the
// driver's cuTensorMapEncodeTiled that checks the documented requirements and writes its own
// description into the (otherwise opaque) 128-byte CUtensorMap, for the emulated TMA to read.
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>

#include <cstdint>
#include <cstring>

namespace bigkern {
namespace attention {
namespace sm90 {

struct EmulatedTensorMap {
  static constexpr uint32_t kMagic = 0x7e4a5031;
  uint32_t magic;
  int32_t element_bytes;
  const char* base;
  uint64_t dims[4];
  uint64_t strides[4];  // bytes, strides[0] = element size
  uint32_t box[4];
};
static_assert(sizeof(EmulatedTensorMap) <= sizeof(CUtensorMap), "fits in a CUtensorMap");

inline CUresult emulated_encode_tiled(CUtensorMap* map, CUtensorMapDataType type, cuuint32_t rank, void* address,
                                      const cuuint64_t* dims, const cuuint64_t* strides, const cuuint32_t* box,
                                      const cuuint32_t* element_strides, CUtensorMapInterleave interleave,
                                      CUtensorMapSwizzle swizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill) {
  EmulatedTensorMap m{};
  m.magic = EmulatedTensorMap::kMagic;
  m.element_bytes = type == CU_TENSOR_MAP_DATA_TYPE_FLOAT16 || type == CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 ? 2 : 0;
  m.base = static_cast<const char*>(address);
  // the requirements the kernels rely on (cuda.h's documentation of cuTensorMapEncodeTiled)
  if (rank != 4 || m.element_bytes == 0 || reinterpret_cast<uintptr_t>(address) % 16 ||
      interleave != CU_TENSOR_MAP_INTERLEAVE_NONE || swizzle != CU_TENSOR_MAP_SWIZZLE_128B)
    return CUDA_ERROR_INVALID_VALUE;
  uint64_t nested = dims[0] * m.element_bytes;
  m.strides[0] = m.element_bytes;
  for (int d = 0; d < 4; ++d) {
    if (dims[d] == 0 || dims[d] > (uint64_t(1) << 32) || box[d] == 0 || box[d] > 256 || element_strides[d] != 1)
      return CUDA_ERROR_INVALID_VALUE;
    m.dims[d] = dims[d];
    m.box[d] = box[d];
    if (d > 0) {
      const uint64_t stride = strides[d - 1];
      if (stride % 16 || stride >= (uint64_t(1) << 40) || stride < nested) return CUDA_ERROR_INVALID_VALUE;
      m.strides[d] = stride;
      nested = stride * dims[d];
    }
  }
  if (box[0] * m.element_bytes > 128 || box[0] * m.element_bytes % 16) return CUDA_ERROR_INVALID_VALUE;
  std::memset(map, 0, sizeof(*map));
  std::memcpy(map, &m, sizeof(m));
  return CUDA_SUCCESS;
}

inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() { return &emulated_encode_tiled; }

}  // namespace sm90
}  // namespace attention
}  // namespace bigkern
