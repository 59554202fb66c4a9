#pragma once
// Shared by the layer kernels (include/pion/cuda/layers.h): argument checks, launch sizes and
// deterministic block reductions. Their GEMMs go through cuda/gemm.cuh (gemm_rm_strided).
#include <cstdint>
#include <limits>
#include <string>

#include "../context.cuh"
#include "../gemm.cuh"
#include "pion/cuda/layers.h"

namespace pion::cuda::layers::detail {

constexpr int kThreads = 256;  // elementwise kernels and one-block-per-row reductions

inline cudaStream_t stream_of(Context& ctx) {
  return ctx.impl().stream;
}
inline cublasHandle_t blas_of(Context& ctx) {
  return ctx.impl().blas;
}

// Grid for count elements, one per thread, grid-stride loops covering the rest.
inline unsigned blocks_for(i64 count) {
  const i64 blocks = (count + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 65535 * 16 ? (blocks > 0 ? blocks : 1) : 65535 * 16);
}

inline void require(bool ok, const std::string& who, const std::string& what) {
  check(ok, "cuda " + who + ": " + what);
}
inline void require_positive(i64 v, const std::string& who, const char* name) {
  require(v > 0, who, std::string(name) + " must be > 0 (got " + std::to_string(v) + ")");
}
// Grid dimensions and cuBLAS arguments are int / unsigned.
inline int as_int(i64 v, const std::string& who, const char* name) {
  require(v >= 0 && v <= std::numeric_limits<int>::max(), who,
          std::string(name) + " = " + std::to_string(v) + " does not fit an int");
  return static_cast<int>(v);
}

// ---- reductions: every lane / thread ends with the same value ---------------------------
// An xor butterfly adds the same pairs in the same order on every lane (a + b == b + a
// exactly), so all lanes hold identical bits and the order is fixed: deterministic.
__device__ inline float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ inline float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
// blockDim.x a multiple of 32 (<= 1024); every thread of the block must call it. The final
// barrier lets a kernel call it again (the shared slots are reused).
__device__ inline float block_sum(float v) {
  __shared__ float partial[32];
  const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = lane < (blockDim.x >> 5) ? partial[lane] : 0.0f;
  v = warp_sum(v);
  __syncthreads();
  return v;
}
__device__ inline float block_max(float v) {
  __shared__ float partial[32];
  const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
  v = warp_max(v);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = lane < (blockDim.x >> 5) ? partial[lane] : -INFINITY;
  v = warp_max(v);
  __syncthreads();
  return v;
}

}  // namespace pion::cuda::layers::detail
