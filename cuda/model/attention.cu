// Causal multi-head self-attention, the straightforward version: per (batch, head) the
// scores S = scale Q K^T and O = P V go through strided-batched cuBLAS GEMMs (one call per
// batch element, batched over the heads: a head's Q, K, V are head_dim columns apart inside
// the [q | k | v] rows), with a masked softmax kernel in between. The seq x seq scores are
// materialised (probs is kept for backward). A fused flash-attention kernel is the next step
// for long contexts.
#include <cmath>

#include "common.cuh"

namespace pion::cuda::layers {

using namespace detail;

namespace {

// One block per score row r of [batch * n_head * seq, seq]; query position i = r % seq sees
// keys j <= i. In place: scores -> probabilities, zeros above the diagonal.
__global__ void causal_softmax_kernel(float* probs, i64 seq) {
  const i64 r = blockIdx.x;
  const i64 i = r % seq;
  float* row = probs + r * seq;
  float mx = -INFINITY;
  for (i64 j = threadIdx.x; j <= i; j += blockDim.x) mx = fmaxf(mx, row[j]);
  mx = block_max(mx);
  float sum = 0.0f;
  for (i64 j = threadIdx.x; j <= i; j += blockDim.x) {
    const float e = expf(row[j] - mx);
    row[j] = e;  // read back below by this same thread only
    sum += e;
  }
  sum = block_sum(sum);
  const float inv = 1.0f / sum;
  for (i64 j = threadIdx.x; j < seq; j += blockDim.x) row[j] = j <= i ? row[j] * inv : 0.0f;
}

// One block per row: dS_ij = P_ij (dP_ij - sum_k P_ik dP_ik) in place over dP (scratch);
// P is 0 above the diagonal, so dS is too.
__global__ void causal_softmax_backward_kernel(float* ds, const float* probs, i64 seq) {
  const i64 r = blockIdx.x;
  const i64 i = r % seq;
  float* row = ds + r * seq;
  const float* p = probs + r * seq;
  float dot = 0.0f;
  for (i64 j = threadIdx.x; j <= i; j += blockDim.x) dot += p[j] * row[j];
  dot = block_sum(dot);
  for (i64 j = threadIdx.x; j < seq; j += blockDim.x)
    row[j] = j <= i ? p[j] * (row[j] - dot) : 0.0f;
}

void check_attention(i64 batch, i64 seq, i64 n_head, i64 head_dim, MatmulPrecision precision,
                     const std::string& who) {
  require_positive(batch, who, "batch");
  require_positive(seq, who, "seq");
  require_positive(n_head, who, "n_head");
  require_positive(head_dim, who, "head_dim");
  require(precision != MatmulPrecision::Bf16, who,
          "Bf16 is not supported for attention (use Fp32 or Tf32)");
  as_int(batch * n_head * seq, who, "batch * n_head * seq (softmax rows)");
}

}  // namespace

void attention_forward(Context& ctx, float* out, float* probs, const float* qkv, i64 batch, i64 seq,
                       i64 n_head, i64 head_dim, MatmulPrecision precision) {
  check_attention(batch, seq, n_head, head_dim, precision, "attention_forward");
  const i64 d = n_head * head_dim;
  const i64 stride = 3 * d;  // row stride of qkv
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  const long long ss = static_cast<long long>(seq * seq);  // one head's score matrix
  for (i64 b = 0; b < batch; ++b) {
    const float* q = qkv + b * seq * stride;  // head h: + h * head_dim
    const float* k = q + d;
    float* p = probs + b * n_head * ss;  // head h: + h * seq * seq
    // S [seq, seq] = scale Q [seq, hd] K^T.
    gemm_rm_strided(blas_of(ctx), gemm_types(precision), false, true, seq, seq, head_dim, scale, q,
                    stride, head_dim, k, stride, head_dim, 0.0f, p, seq, ss, n_head);
  }
  const i64 rows = batch * n_head * seq;
  causal_softmax_kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream_of(ctx)>>>(probs, seq);
  PION_CUDA_CHECK_LAUNCH("causal_softmax_kernel");
  for (i64 b = 0; b < batch; ++b) {
    const float* v = qkv + b * seq * stride + 2 * d;
    const float* p = probs + b * n_head * ss;
    // O [seq, hd] (columns h hd.. of out's [seq, d] rows) = P [seq, seq] V [seq, hd].
    gemm_rm_strided(blas_of(ctx), gemm_types(precision), false, false, seq, head_dim, seq, 1.0f, p,
                    seq, ss, v, stride, head_dim, 0.0f, out + b * seq * d, d, head_dim, n_head);
  }
}

void attention_backward(Context& ctx, float* dqkv, float* scratch, const float* dout,
                        const float* probs, const float* qkv, i64 batch, i64 seq, i64 n_head,
                        i64 head_dim, MatmulPrecision precision) {
  check_attention(batch, seq, n_head, head_dim, precision, "attention_backward");
  const i64 d = n_head * head_dim;
  const i64 stride = 3 * d;
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  const long long ss = static_cast<long long>(seq * seq);
  // out = P V: dP = dout V^T (into scratch), dV += P^T dout.
  for (i64 b = 0; b < batch; ++b) {
    const float* v = qkv + b * seq * stride + 2 * d;
    float* dv = dqkv + b * seq * stride + 2 * d;
    const float* go = dout + b * seq * d;  // head h: + h * head_dim, row stride d
    const float* p = probs + b * n_head * ss;
    float* ds = scratch + b * n_head * ss;
    // dP [seq, seq] = dO [seq, hd] V^T.
    gemm_rm_strided(blas_of(ctx), gemm_types(precision), false, true, seq, seq, head_dim, 1.0f, go,
                    d, head_dim, v, stride, head_dim, 0.0f, ds, seq, ss, n_head);
    // dV [seq, hd] += P^T [seq, seq] dO [seq, hd].
    gemm_rm_strided(blas_of(ctx), gemm_types(precision), true, false, seq, head_dim, seq, 1.0f, p,
                    seq, ss, go, d, head_dim, 1.0f, dv, stride, head_dim, n_head);
  }
  const i64 rows = batch * n_head * seq;
  causal_softmax_backward_kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream_of(ctx)>>>(
      scratch, probs, seq);
  PION_CUDA_CHECK_LAUNCH("causal_softmax_backward_kernel");
  // S = scale Q K^T: dQ += scale dS K, dK += scale dS^T Q.
  for (i64 b = 0; b < batch; ++b) {
    const float* q = qkv + b * seq * stride;
    const float* k = q + d;
    float* dq = dqkv + b * seq * stride;
    float* dk = dq + d;
    const float* ds = scratch + b * n_head * ss;
    // dQ [seq, hd] += scale dS [seq, seq] K [seq, hd].
    gemm_rm_strided(blas_of(ctx), gemm_types(precision), false, false, seq, head_dim, seq, scale,
                    ds, seq, ss, k, stride, head_dim, 1.0f, dq, stride, head_dim, n_head);
    // dK [seq, hd] += scale dS^T [seq, seq] Q [seq, hd].
    gemm_rm_strided(blas_of(ctx), gemm_types(precision), true, false, seq, head_dim, seq, scale, ds,
                    seq, ss, q, stride, head_dim, 1.0f, dk, stride, head_dim, n_head);
  }
}

}  // namespace pion::cuda::layers
