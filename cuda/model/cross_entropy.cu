// Softmax cross-entropy, forward and backward fused: three launches, no host round trip.
//   1. one block counts the rows with a valid target (and the bad ones >= v) and stores the
//      gradient scale dloss / count on the device;
//   2. one block per row: logsumexp, the row's loss, and the row's gradient
//      scale (softmax - onehot), added into fp32 dlogits or assigned (fp32, or bf16 for the
//      LM head's bf16 GEMMs, which then read it without a conversion pass);
//   3. one block sums the row losses in double, in a fixed order, into the mean.
// RL's objective path (CudaLlama::target_log_probs / weighted_backward) adds two one-block-per-row
// kernels over the same logits and lse: per-target log-probs and entropies (kept in double for
// the host), and the gradient of the per-target weighted cross-entropy (assigned, fp32 or bf16,
// like the row kernel's).
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

// RL. One block per row: log p(target) = x[t] - lse in double, and the entropy
// H = -sum_j p_j (x_j - lse), p_j = exp(x_j - lse) (per-thread fp32 partials, then a double
// block sum in a fixed order). Rows without a valid target get 0 for both.
__global__ void target_log_probs_kernel(double* log_probs, double* entropies, const float* logits,
                                        const float* lse, const std::int32_t* targets, i64 v) {
  const i64 r = blockIdx.x;
  const std::int32_t t = targets[r];
  if (t < 0 || t >= v) {  // uniform over the block: no thread reaches the barriers below
    if (threadIdx.x == 0) {
      log_probs[r] = 0.0;
      entropies[r] = 0.0;
    }
    return;
  }
  const float* x = logits + r * v;
  const float l = lse[r];
  float partial = 0.0f;
  for (i64 j = threadIdx.x; j < v; j += blockDim.x) {
    const float lp = x[j] - l;
    partial -= expf(lp) * lp;
  }
  const double h = block_sum_wide(static_cast<double>(partial));
  if (threadIdx.x == 0) {
    log_probs[r] = static_cast<double>(x[t]) - static_cast<double>(l);
    entropies[r] = h;
  }
}

// One block per row: dlogits[r] = g (softmax - onehot), g = row_scale[r], every element stored
// (zeros on a row without a valid target or with g = 0), each computed as (0 + g exp(x_j - lse))
// - g at the target: the bits the CPU's weighted_cross_entropy_backward adds into a zeroed
// buffer (fp32 Out), or the bits to_bf16_kernel gives of them (bf16 Out), as ce_row does.
template <class Out>
__device__ void weighted_ce_row(Out* dlogits, const float* logits, const float* lse,
                                const std::int32_t* targets, const float* row_scale, i64 v) {
  const i64 r = blockIdx.x;
  const std::int32_t t = targets[r];
  const float g = row_scale[r];
  Out* dx = dlogits + r * v;
  if (t < 0 || t >= v || g == 0.0f) {
    for (i64 j = threadIdx.x; j < v; j += blockDim.x) store_grad(dx + j, 0.0f);
    return;
  }
  const float* x = logits + r * v;
  const float l = lse[r];
  for (i64 j = threadIdx.x; j < v; j += blockDim.x) {
    float grad = 0.0f;
    grad += g * expf(x[j] - l);
    if (j == t) grad -= g;
    store_grad(dx + j, grad);
  }
}

__global__ void weighted_ce_backward_kernel(float* dlogits, const float* logits, const float* lse,
                                            const std::int32_t* targets, const float* row_scale,
                                            i64 v) {
  weighted_ce_row<float>(dlogits, logits, lse, targets, row_scale, v);
}
__global__ void weighted_ce_backward_bf16_kernel(__nv_bfloat16* dlogits, const float* logits,
                                                 const float* lse, const std::int32_t* targets,
                                                 const float* row_scale, i64 v) {
  weighted_ce_row<__nv_bfloat16>(dlogits, logits, lse, targets, row_scale, v);
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

struct TargetLogProbs::Impl {
  double* values = nullptr;  // [2, max_rows]: log-probs, then entropies
  i64 max_rows = 0;
};

TargetLogProbs::TargetLogProbs(i64 max_rows) : impl_(std::make_unique<Impl>()) {
  require_positive(max_rows, "TargetLogProbs", "max_rows");
  void* p = nullptr;
  PION_CUDA_CHECK(cudaMalloc(&p, 2 * static_cast<std::size_t>(max_rows) * sizeof(double)));
  impl_->values = static_cast<double*>(p);
  impl_->max_rows = max_rows;
}

TargetLogProbs::~TargetLogProbs() {
  if (impl_ != nullptr && impl_->values != nullptr) cudaFree(impl_->values);
}

void TargetLogProbs::read(Context& ctx, double* log_probs, double* entropies, i64 n) const {
  require(n >= 0 && n <= impl_->max_rows, "TargetLogProbs::read",
          "n = " + std::to_string(n) + " rows but room for " + std::to_string(impl_->max_rows));
  if (n == 0) return;
  PION_CUDA_CHECK(cudaStreamSynchronize(stream_of(ctx)));
  const std::size_t bytes = static_cast<std::size_t>(n) * sizeof(double);
  PION_CUDA_CHECK(cudaMemcpy(log_probs, impl_->values, bytes, cudaMemcpyDeviceToHost));
  if (entropies != nullptr)
    PION_CUDA_CHECK(
        cudaMemcpy(entropies, impl_->values + impl_->max_rows, bytes, cudaMemcpyDeviceToHost));
}

void target_log_probs(Context& ctx, TargetLogProbs& out, const float* logits, const float* lse,
                      const std::int32_t* targets, i64 n, i64 v) {
  const std::string who = "target_log_probs";
  require_positive(n, who, "n");
  require_positive(v, who, "v");
  require(n <= out.impl().max_rows, who,
          "n = " + std::to_string(n) + " rows but the TargetLogProbs was made for " +
              std::to_string(out.impl().max_rows));
  const unsigned rows = static_cast<unsigned>(as_int(n, who, "n"));
  double* values = out.impl().values;
  target_log_probs_kernel<<<rows, kThreads, 0, stream_of(ctx)>>>(
      values, values + out.impl().max_rows, logits, lse, targets, v);
  PION_CUDA_CHECK_LAUNCH("target_log_probs_kernel");
}

void weighted_cross_entropy_backward(Context& ctx, float* dlogits, const float* logits,
                                     const float* lse, const std::int32_t* targets,
                                     const float* row_scale, i64 n, i64 v) {
  const std::string who = "weighted_cross_entropy_backward";
  require_positive(n, who, "n");
  require_positive(v, who, "v");
  const unsigned rows = static_cast<unsigned>(as_int(n, who, "n"));
  weighted_ce_backward_kernel<<<rows, kThreads, 0, stream_of(ctx)>>>(dlogits, logits, lse, targets,
                                                                     row_scale, v);
  PION_CUDA_CHECK_LAUNCH("weighted_ce_backward_kernel");
}

void weighted_cross_entropy_backward_bf16(Context& ctx, void* dlogits_bf16, const float* logits,
                                          const float* lse, const std::int32_t* targets,
                                          const float* row_scale, i64 n, i64 v) {
  const std::string who = "weighted_cross_entropy_backward_bf16";
  require(dlogits_bf16 != nullptr, who, "dlogits_bf16 must not be null");
  require_positive(n, who, "n");
  require_positive(v, who, "v");
  const unsigned rows = static_cast<unsigned>(as_int(n, who, "n"));
  weighted_ce_backward_bf16_kernel<<<rows, kThreads, 0, stream_of(ctx)>>>(
      static_cast<__nv_bfloat16*>(dlogits_bf16), logits, lse, targets, row_scale, v);
  PION_CUDA_CHECK_LAUNCH("weighted_ce_backward_bf16_kernel");
}

}  // namespace pion::cuda::layers
