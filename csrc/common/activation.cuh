// Activations shared by every CUDA kernel's epilogue, in fp32.
// The codes match bigkern/ops/epilogue.py ACTIVATIONS and kernels/epilogue.py (a test checks).
#pragma once

#include <cuda_runtime.h>

namespace bigkern {

enum Activation : int {
  kNone = 0,
  kRelu = 1,
  kGelu = 2,      // exact erf form, torch's gelu(approximate="none")
  kGeluTanh = 3,  // torch's gelu(approximate="tanh")
  kSilu = 4,
  kSigmoid = 5,
  kTanh = 6,
  kLeakyRelu = 7,
  kNumActivations = 8,
};

// sigmoid(z) and 1 - sigmoid(z), neither by cancellation: with e = exp(-|z|) <= 1 they are
// 1/(1+e) and e/(1+e) in the order the sign of z decides. NaN stays NaN; exp never overflows.
__device__ __forceinline__ void sigmoid_parts(float z, float& s, float& one_minus_s) {
  const float e = expf(-fabsf(z));
  const float near_one = 1.f / (1.f + e);
  const float near_zero = e * near_one;
  const bool positive = z >= 0.f;
  s = positive ? near_one : near_zero;
  one_minus_s = positive ? near_zero : near_one;
}

__device__ __forceinline__ float sigmoidf(float z) {
  float s, one_minus_s;
  sigmoid_parts(z, s, one_minus_s);
  return s;
}

constexpr float kSqrt1_2 = 0.7071067811865476f;
constexpr float kInvSqrt2Pi = 0.3989422804014327f;
constexpr float kTwoSqrt2OverPi = 1.5957691216057308f;  // 2 sqrt(2/pi)
constexpr float kGeluCubic = 0.044715f;

// act(z). NaN propagates as in torch (relu(NaN) = NaN: compare with <, never fmaxf).
template <int ACT>
__device__ __forceinline__ float activate(float z, float negative_slope) {
  if constexpr (ACT == kRelu) return z < 0.f ? 0.f : z;
  else if constexpr (ACT == kGelu) return 0.5f * z * (1.f + erff(z * kSqrt1_2));
  // z/2 (1 + tanh u) = z sigmoid(2u): no cancellation in 1 + tanh u where u < 0
  else if constexpr (ACT == kGeluTanh) return z * sigmoidf(kTwoSqrt2OverPi * (z + kGeluCubic * z * z * z));
  else if constexpr (ACT == kSilu) return z * sigmoidf(z);
  else if constexpr (ACT == kSigmoid) return sigmoidf(z);
  else if constexpr (ACT == kTanh) return tanhf(z);
  else if constexpr (ACT == kLeakyRelu) return z > 0.f ? z : z * negative_slope;  // torch's form (sign of -0, 0 * inf slope)
  else return z;
}

// grad_z = grad_y * act'(z), with torch's conventions at the kinks (relu'(0) = 0, leaky'(0) = slope)
// and at NaN (relu passes grad_y through, as torch's z <= 0 ? 0 : grad does; leaky scales it).
template <int ACT>
__device__ __forceinline__ float activation_grad(float z, float grad_y, float negative_slope) {
  if constexpr (ACT == kRelu) return z <= 0.f ? 0.f : grad_y;
  else if constexpr (ACT == kGelu) {
    const float cdf = 0.5f * (1.f + erff(z * kSqrt1_2));
    const float pdf = expf(-0.5f * z * z) * kInvSqrt2Pi;
    return grad_y * (cdf + z * pdf);
  } else if constexpr (ACT == kGeluTanh) {
    // y = z s, s = sigmoid(2u): y' = s + z s (1 - s) 2u'
    float s, one_minus_s;
    sigmoid_parts(kTwoSqrt2OverPi * (z + kGeluCubic * z * z * z), s, one_minus_s);
    const float two_du = kTwoSqrt2OverPi * (1.f + 3.f * kGeluCubic * z * z);
    return grad_y * (s + z * s * one_minus_s * two_du);
  } else if constexpr (ACT == kSilu) {
    float s, one_minus_s;
    sigmoid_parts(z, s, one_minus_s);
    return grad_y * s * (1.f + z * one_minus_s);
  } else if constexpr (ACT == kSigmoid) {
    float s, one_minus_s;
    sigmoid_parts(z, s, one_minus_s);
    return grad_y * s * one_minus_s;
  } else if constexpr (ACT == kTanh) {
    const float t = tanhf(z);
    return grad_y * (1.f - t * t);
  } else if constexpr (ACT == kLeakyRelu) return z > 0.f ? grad_y : grad_y * negative_slope;
  else return grad_y;
}

// Calls fn(std::integral_constant<int, ACT>{}) for a run-time activation code.
template <typename Fn>
inline bool dispatch_activation(int activation, Fn&& fn) {
  switch (activation) {
    case kNone: fn(std::integral_constant<int, kNone>{}); return true;
    case kRelu: fn(std::integral_constant<int, kRelu>{}); return true;
    case kGelu: fn(std::integral_constant<int, kGelu>{}); return true;
    case kGeluTanh: fn(std::integral_constant<int, kGeluTanh>{}); return true;
    case kSilu: fn(std::integral_constant<int, kSilu>{}); return true;
    case kSigmoid: fn(std::integral_constant<int, kSigmoid>{}); return true;
    case kTanh: fn(std::integral_constant<int, kTanh>{}); return true;
    case kLeakyRelu: fn(std::integral_constant<int, kLeakyRelu>{}); return true;
    default: return false;
  }
}

}  // namespace bigkern
