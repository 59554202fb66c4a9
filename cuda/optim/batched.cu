// The kernels shared by the GPU optimizers (declared in batched.cuh).
#include "batched.cuh"

namespace pion::cuda::detail {
namespace {

__global__ void set_lr_kernel(StepScalars* s, double lr) {
  s->lr = lr;
}

__global__ void set_grad_scale_kernel(StepScalars* s, float scale) {
  s->grad_scale = scale;
}

// Grid elementwise_grid. x * scale rounded once, as the trainer's clip pass over the whole
// gradient buffer (scale_kernel) computes it.
__global__ void scale_gradients_kernel(void* const* g_ptrs, std::int64_t count,
                                       const StepScalars* s) {
  const float scale = s->grad_scale;
  if (scale == 1.0f) return;
  float* g = static_cast<float*>(g_ptrs[blockIdx.y]);
  for_each_lanes(count, aligned16(g), [&](auto width, std::int64_t i) {
    constexpr int W = decltype(width)::value;
    Lanes<float, W> v = load_lanes<W>(g, i);
#pragma unroll
    for (int l = 0; l < W; ++l) v.v[l] = __fmul_rn(v.v[l], scale);
    store_lanes<W>(g, i, v);
  });
}

__global__ void begin_step_kernel(StepScalars* s) {
  s->bad_grad = 0;
}

__global__ void count_step_kernel(StepScalars* s) {
  if (s->bad_grad != 0)
    ++s->skipped;
  else
    ++s->steps;
}

// Grid elementwise_grid: float4 loads when x is 16-byte aligned, then the count % 4 tail.
__global__ void flag_non_finite_kernel(void* const* x_ptrs, std::int64_t count, StepScalars* s) {
  const float* x = static_cast<const float*>(x_ptrs[blockIdx.y]);
  int bad = 0;
  for_each_lanes(count, aligned16(x), [&](auto width, std::int64_t i) {
    constexpr int W = decltype(width)::value;
    const Lanes<float, W> v = load_lanes<W>(x, i);
#pragma unroll
    for (int l = 0; l < W; ++l) bad |= !isfinite(v.v[l]);
  });
  // One atomic per block at most; every thread reaches the barrier (the loop exits at the
  // same count for all).
  if (__syncthreads_or(bad) != 0 && threadIdx.x == 0) atomicOr(&s->bad_grad, 1);
}

__global__ void sum_squares_kernel(void* const* x_ptrs, void* const* y_ptrs, std::int64_t count,
                                   double* partial) {
  __shared__ double shared[kThreads];
  const float* x = static_cast<const float*>(x_ptrs[blockIdx.y]);
  const float* y = y_ptrs != nullptr ? static_cast<const float*>(y_ptrs[blockIdx.y]) : nullptr;
  double acc = 0.0;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    // (p + q) in double, as the CPU's norm_of_sum.
    const double e = static_cast<double>(x[i]) + (y != nullptr ? static_cast<double>(y[i]) : 0.0);
    acc += e * e;
  }
  shared[threadIdx.x] = acc;
  __syncthreads();
  for (unsigned stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) shared[threadIdx.x] += shared[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[blockIdx.y * gridDim.x + blockIdx.x] = shared[0];
}

}  // namespace

void queue_set_lr(cudaStream_t stream, StepScalars* scalars, double lr) {
  set_lr_kernel<<<1, 1, 0, stream>>>(scalars, lr);
  PION_CUDA_CHECK_LAUNCH("set_lr");
}

void queue_set_grad_scale(cudaStream_t stream, StepScalars* scalars, float scale) {
  set_grad_scale_kernel<<<1, 1, 0, stream>>>(scalars, scale);
  PION_CUDA_CHECK_LAUNCH("set_grad_scale");
}

void queue_scale_gradients(cudaStream_t stream, const DevicePointers& g, std::int64_t count,
                           std::size_t batch, const StepScalars* scalars) {
  scale_gradients_kernel<<<elementwise_grid(count, batch), kThreads, 0, stream>>>(g.get(), count,
                                                                                  scalars);
  PION_CUDA_CHECK_LAUNCH("scale_gradients");
}

void queue_begin_step(cudaStream_t stream, StepScalars* scalars) {
  begin_step_kernel<<<1, 1, 0, stream>>>(scalars);
  PION_CUDA_CHECK_LAUNCH("begin_step");
}

void queue_flag_non_finite(cudaStream_t stream, const DevicePointers& x, std::int64_t count,
                           std::size_t batch, StepScalars* scalars) {
  flag_non_finite_kernel<<<elementwise_grid(count, batch), kThreads, 0, stream>>>(x.get(), count,
                                                                                  scalars);
  PION_CUDA_CHECK_LAUNCH("flag_non_finite");
}

void queue_count_step(cudaStream_t stream, StepScalars* scalars) {
  count_step_kernel<<<1, 1, 0, stream>>>(scalars);
  PION_CUDA_CHECK_LAUNCH("count_step");
}

void queue_sum_squares(cudaStream_t stream, const DevicePointers& x, const DevicePointers* y,
                       std::int64_t count, std::size_t batch, double* partial) {
  sum_squares_kernel<<<batch_grid(batch), kThreads, 0, stream>>>(
      x.get(), y != nullptr ? y->get() : nullptr, count, partial);
  PION_CUDA_CHECK_LAUNCH("sum_squares");
}

}  // namespace pion::cuda::detail
