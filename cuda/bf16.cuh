#pragma once
// Conversions between float and the element types of GEMM operands (float, bf16), for
// kernels templated on the type: Muon's bf16 Newton-Schulz and the GEMM benchmark's fills.
#include <cuda_bf16.h>

namespace pion::cuda {

__device__ inline float to_float(float x) {
  return x;
}
__device__ inline float to_float(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

// Rounds to nearest even for bf16.
template <class T>
__device__ inline T from_float(float x);
template <>
__device__ inline float from_float<float>(float x) {
  return x;
}
template <>
__device__ inline __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

}  // namespace pion::cuda
