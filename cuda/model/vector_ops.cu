// Whole-buffer passes for the GPU trainer (include/pion/cuda/vector_ops.h).
#include "common.cuh"
#include "pion/cuda/vector_ops.h"

namespace pion::cuda {

using namespace layers::detail;

namespace {

// Pass 1 writes one partial per block (grid-stride over the buffer, block tree sum in
// double); pass 2 sums the partials in one block. Fixed shapes: deterministic.
constexpr int kSumBlocks = 1024;
constexpr int kSumThreads = 256;

__device__ double block_sum_double(double v) {
  __shared__ double partial[32];
  const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = lane < (blockDim.x >> 5) ? partial[lane] : 0.0;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();
  return v;
}

__global__ void sum_squares_partial(double* partials, const float* x, std::int64_t n) {
  double acc = 0.0;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const double v = x[i];
    acc += v * v;
  }
  acc = block_sum_double(acc);
  if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

__global__ void sum_partials(double* out, const double* partials, int count) {
  double acc = 0.0;
  for (int i = threadIdx.x; i < count; i += blockDim.x) acc += partials[i];
  acc = block_sum_double(acc);
  if (threadIdx.x == 0) *out = acc;
}

__global__ void scale_kernel(float* x, std::int64_t n, float factor) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride)
    x[i] *= factor;
}

}  // namespace

DeviceScalars::DeviceScalars(std::size_t count) : count_(count) {
  // One extra kSumBlocks-long region for sum_squares' partials, after the results.
  PION_CUDA_CHECK(cudaMalloc(&ptr_, (count + kSumBlocks) * sizeof(double)));
  PION_CUDA_CHECK(cudaMemset(ptr_, 0, (count + kSumBlocks) * sizeof(double)));
}

DeviceScalars::~DeviceScalars() {
  if (ptr_ != nullptr) cudaFree(ptr_);  // no throw from a destructor
}

std::vector<double> DeviceScalars::read(Context& ctx) const {
  std::vector<double> host(count_);
  ctx.synchronize();
  PION_CUDA_CHECK(cudaMemcpy(host.data(), ptr_, count_ * sizeof(double), cudaMemcpyDeviceToHost));
  return host;
}

void fill_zero(Context& ctx, float* x, std::int64_t count) {
  layers::detail::require(count >= 0, "fill_zero", "count must be >= 0");
  if (count == 0) return;
  PION_CUDA_CHECK(
      cudaMemsetAsync(x, 0, static_cast<std::size_t>(count) * sizeof(float), stream_of(ctx)));
}

void sum_squares(Context& ctx, DeviceScalars& out, std::size_t slot, const float* x,
                 std::int64_t count) {
  require(slot < out.size(), "sum_squares", "slot out of range");
  require(count >= 0, "sum_squares", "count must be >= 0");
  double* partials = out.data() + out.size();
  sum_squares_partial<<<kSumBlocks, kSumThreads, 0, stream_of(ctx)>>>(partials, x, count);
  PION_CUDA_CHECK_LAUNCH("sum_squares_partial");
  sum_partials<<<1, kSumThreads, 0, stream_of(ctx)>>>(out.data() + slot, partials, kSumBlocks);
  PION_CUDA_CHECK_LAUNCH("sum_partials");
}

void scale_inplace(Context& ctx, float* x, std::int64_t count, float factor) {
  require(count >= 0, "scale_inplace", "count must be >= 0");
  if (count == 0) return;
  scale_kernel<<<blocks_for(count), kThreads, 0, stream_of(ctx)>>>(x, count, factor);
  PION_CUDA_CHECK_LAUNCH("scale_kernel");
}

}  // namespace pion::cuda
