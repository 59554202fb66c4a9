// Softmax cross-entropy, forward and backward fused: three launches, no host round trip.
//   1. one block counts the rows with a valid target (and the bad ones >= v) and stores the
//      gradient scale dloss / count on the device;
//   2. one block per row: logsumexp, the row's loss, and the row's gradient
//      scale (softmax - onehot), added into fp32 dlogits or assigned (fp32, or bf16 for the
//      LM head's bf16 GEMMs, which then read it without a conversion pass);
//   3. one block sums the row losses in double, in a fixed order, into the mean.
#include <cuda_bf16.h>

#include <utility>

#include "common.cuh"

namespace pion::cuda::layers {

using namespace detail;

namespace {

struct CeScalars {
  double loss;
  long long count;
  long long bad_targets;
  float grad_scale;  // dloss / count, 0 when no row counts
};

constexpr int kReduceThreads = 1024;

// Deterministic block sum for integer or double partials (same butterfly as block_sum).
template <class T>
__device__ T block_sum_wide(T v) {
  __shared__ T partial[32];
  const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = lane < (blockDim.x >> 5) ? partial[lane] : T(0);
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();
  return v;
}

__global__ void ce_count_kernel(CeScalars* s, const std::int32_t* targets, i64 n, i64 v,
                                double dloss) {
  long long count = 0, bad = 0;
  for (i64 i = threadIdx.x; i < n; i += blockDim.x) {
    const std::int32_t t = targets[i];
    count += (t >= 0 && t < v) ? 1 : 0;
    bad += t >= v ? 1 : 0;
  }
  count = block_sum_wide(count);
  bad = block_sum_wide(bad);
  if (threadIdx.x == 0) {
    s->count = count;
    s->bad_targets = bad;
    s->grad_scale = count > 0 ? static_cast<float>(dloss / static_cast<double>(count)) : 0.0f;
  }
}

// How ce_row stores a gradient value.
__device__ inline void store_grad(float* p, float g) {
  *p = g;
}
__device__ inline void store_grad(__nv_bfloat16* p, float g) {
  *p = __float2bfloat16(g);  // round to nearest even, as to_bf16_kernel (linear.cu)
}

// The body of the three row kernels below (one kernel per output, named apart so that counts
// and profiles tell them apart; every thread of the block calls it). One block per row:
// lse = max + log(sum exp(x - max)); loss_i = lse - x[target] for a valid target, else 0; the
// gradient g exp(x_j - lse), minus g at the target column (the CPU's order). kAssign false:
// added into dlogits (Out float). kAssign true: stored, every element of the row, zeros on a
// row without a valid target, so the buffer needs no zeroing before; the stored value is the
// one the add made in a zeroed buffer, computed as (0 + g e) - g, so fp32 output has those
// bits and bf16 output has the bits to_bf16_kernel gave of them.
template <class Out, bool kAssign>
__device__ void ce_row(float* row_loss, float* lse, Out* dlogits, const float* logits,
                       const std::int32_t* targets, i64 v, const CeScalars* s) {
  const i64 r = blockIdx.x;
  const float* x = logits + r * v;
  float mx = -INFINITY;
  for (i64 j = threadIdx.x; j < v; j += blockDim.x) mx = fmaxf(mx, x[j]);
  mx = block_max(mx);
  float sum = 0.0f;
  for (i64 j = threadIdx.x; j < v; j += blockDim.x) sum += expf(x[j] - mx);
  sum = block_sum(sum);
  const float l = mx + logf(sum);
  const std::int32_t t = targets[r];
  const bool valid = t >= 0 && t < v;
  if (threadIdx.x == 0) {
    if (lse != nullptr) lse[r] = l;
    row_loss[r] = valid ? l - x[t] : 0.0f;
  }
  if (dlogits == nullptr) return;
  Out* dx = dlogits + r * v;
  if (!valid || s->count == 0) {
    if constexpr (kAssign)
      for (i64 j = threadIdx.x; j < v; j += blockDim.x) store_grad(dx + j, 0.0f);
    return;
  }
  const float g = s->grad_scale;
  for (i64 j = threadIdx.x; j < v; j += blockDim.x) {
    if constexpr (kAssign) {
      float grad = 0.0f;
      grad += g * expf(x[j] - l);
      if (j == t) grad -= g;
      store_grad(dx + j, grad);
    } else {
      dx[j] += g * expf(x[j] - l);
      if (j == t) dx[j] -= g;  // the thread that owns column t, after its own add
    }
  }
}

// dlogits += gradient (fp32).
__global__ void ce_row_kernel(float* row_loss, float* lse, float* dlogits, const float* logits,
                              const std::int32_t* targets, i64 v, const CeScalars* s) {
  ce_row<float, false>(row_loss, lse, dlogits, logits, targets, v, s);
}
// dlogits = gradient (fp32).
__global__ void ce_row_assign_kernel(float* row_loss, float* lse, float* dlogits,
                                     const float* logits, const std::int32_t* targets, i64 v,
                                     const CeScalars* s) {
  ce_row<float, true>(row_loss, lse, dlogits, logits, targets, v, s);
}
// dlogits = gradient rounded to bf16.
__global__ void ce_row_bf16_kernel(float* row_loss, float* lse, __nv_bfloat16* dlogits,
                                   const float* logits, const std::int32_t* targets, i64 v,
                                   const CeScalars* s) {
  ce_row<__nv_bfloat16, true>(row_loss, lse, dlogits, logits, targets, v, s);
}

__global__ void ce_mean_kernel(CeScalars* s, const float* row_loss, i64 n) {
  double total = 0.0;
  for (i64 i = threadIdx.x; i < n; i += blockDim.x) total += static_cast<double>(row_loss[i]);
  total = block_sum_wide(total);
  if (threadIdx.x == 0) s->loss = s->count > 0 ? total / static_cast<double>(s->count) : 0.0;
}

}  // namespace

struct CrossEntropyResult::Impl {
  DeviceBuffer row_loss;
  CeScalars* scalars = nullptr;
  i64 max_rows = 0;
};

CrossEntropyResult::CrossEntropyResult(i64 max_rows) : impl_(std::make_unique<Impl>()) {
  require_positive(max_rows, "CrossEntropyResult", "max_rows");
  impl_->row_loss = DeviceBuffer(static_cast<std::size_t>(max_rows));
  impl_->max_rows = max_rows;
  void* p = nullptr;
  PION_CUDA_CHECK(cudaMalloc(&p, sizeof(CeScalars)));
  impl_->scalars = static_cast<CeScalars*>(p);
  PION_CUDA_CHECK(cudaMemset(p, 0, sizeof(CeScalars)));
  PION_CUDA_CHECK(cudaDeviceSynchronize());
}

CrossEntropyResult::~CrossEntropyResult() {
  if (impl_ != nullptr && impl_->scalars != nullptr) cudaFree(impl_->scalars);
}

CrossEntropyResult::Host CrossEntropyResult::read(Context& ctx) const {
  PION_CUDA_CHECK(cudaStreamSynchronize(stream_of(ctx)));
  CeScalars s{};
  PION_CUDA_CHECK(cudaMemcpy(&s, impl_->scalars, sizeof(s), cudaMemcpyDeviceToHost));
  Host h;
  h.loss = s.loss;
  h.count = s.count;
  h.bad_targets = s.bad_targets;
  return h;
}

namespace {

// Queues the three launches; row_kernel(rows, stream, row_loss, scalars) launches the
// second, the one that writes the chosen dlogits.
template <class RowKernel>
void run_cross_entropy(Context& ctx, CrossEntropyResult& result, const std::int32_t* targets, i64 n,
                       i64 v, double dloss, const std::string& who, const RowKernel& row_kernel) {
  require_positive(n, who, "n");
  require_positive(v, who, "v");
  require(n <= result.impl().max_rows, who,
          "n = " + std::to_string(n) + " rows but the CrossEntropyResult was made for " +
              std::to_string(result.impl().max_rows));
  const unsigned rows = static_cast<unsigned>(as_int(n, who, "n"));
  CeScalars* s = result.impl().scalars;
  float* row_loss = result.impl().row_loss.data();
  const cudaStream_t stream = stream_of(ctx);
  ce_count_kernel<<<1, kReduceThreads, 0, stream>>>(s, targets, n, v, dloss);
  PION_CUDA_CHECK_LAUNCH("ce_count_kernel");
  row_kernel(rows, stream, row_loss, s);
  ce_mean_kernel<<<1, kReduceThreads, 0, stream>>>(s, row_loss, n);
  PION_CUDA_CHECK_LAUNCH("ce_mean_kernel");
}

}  // namespace

void cross_entropy(Context& ctx, CrossEntropyResult& result, float* lse, float* dlogits,
                   const float* logits, const std::int32_t* targets, i64 n, i64 v, double dloss,
                   GradWrite dlogits_write) {
  run_cross_entropy(ctx, result, targets, n, v, dloss, "cross_entropy",
                    [&](unsigned rows, cudaStream_t stream, float* row_loss, const CeScalars* s) {
                      if (dlogits_write == GradWrite::Assign) {
                        ce_row_assign_kernel<<<rows, kThreads, 0, stream>>>(row_loss, lse, dlogits,
                                                                            logits, targets, v, s);
                        PION_CUDA_CHECK_LAUNCH("ce_row_assign_kernel");
                      } else {
                        ce_row_kernel<<<rows, kThreads, 0, stream>>>(row_loss, lse, dlogits, logits,
                                                                     targets, v, s);
                        PION_CUDA_CHECK_LAUNCH("ce_row_kernel");
                      }
                    });
}

void cross_entropy_bf16(Context& ctx, CrossEntropyResult& result, float* lse, void* dlogits_bf16,
                        const float* logits, const std::int32_t* targets, i64 n, i64 v,
                        double dloss) {
  require(dlogits_bf16 != nullptr, "cross_entropy_bf16", "dlogits_bf16 must not be null");
  auto* out = static_cast<__nv_bfloat16*>(dlogits_bf16);
  run_cross_entropy(ctx, result, targets, n, v, dloss, "cross_entropy_bf16",
                    [&](unsigned rows, cudaStream_t stream, float* row_loss, const CeScalars* s) {
                      ce_row_bf16_kernel<<<rows, kThreads, 0, stream>>>(row_loss, lse, out, logits,
                                                                        targets, v, s);
                      PION_CUDA_CHECK_LAUNCH("ce_row_bf16_kernel");
                    });
}

}  // namespace pion::cuda::layers
