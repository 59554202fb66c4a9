// Causal multi-head self-attention, the straightforward version: per (batch, head) the
// scores S = scale Q K^T and O = P V go through strided-batched cuBLAS GEMMs, with a masked
// softmax kernel in between. The seq x seq scores are materialised (probs is kept for
// backward); cuda/model/flash_attention.cu is the fused alternative for long contexts.
//
// Grouped-query attention: query head h reads K/V head h / g (g = n_head / n_kv_head query
// heads per K/V head). One strided-batched call cannot express h / g, so the GEMMs run once
// per (batch element, position r in the group), batched over the K/V heads: member r of
// group kh is query head kh g + r, whose Q / probs / output sit g heads apart from the next
// group's, while K and V advance one head per group. With g = 1 this is one call per batch
// element over all heads (plain multi-head attention). The backward's dK and dV get one
// accumulating (beta = 1) call per group member in order r = 0, 1, ..., so the sum over a
// group has a fixed order and no two batch entries of one call write the same K/V head.
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

// Returns the K/V head count (n_kv_head, or n_head for 0).
i64 check_attention(i64 batch, i64 seq, i64 n_head, i64 head_dim, i64 n_kv_head,
                    MatmulPrecision precision, const std::string& who) {
  require_positive(batch, who, "batch");
  require_positive(seq, who, "seq");
  require_positive(n_head, who, "n_head");
  require(n_kv_head >= 0, who,
          "n_kv_head must be >= 0 (0: n_head), got " + std::to_string(n_kv_head));
  if (n_kv_head == 0) n_kv_head = n_head;
  require(n_head % n_kv_head == 0, who,
          "n_kv_head (" + std::to_string(n_kv_head) + ") must divide n_head (" +
              std::to_string(n_head) + ")");
  require_positive(head_dim, who, "head_dim");
  require(precision != MatmulPrecision::Bf16, who,
          "Bf16 is not supported for attention (use Fp32 or Tf32)");
  as_int(batch * n_head * seq, who, "batch * n_head * seq (softmax rows)");
  return n_kv_head;
}

}  // namespace

void attention_forward(Context& ctx, float* out, float* probs, const float* qkv, i64 batch, i64 seq,
                       i64 n_head, i64 head_dim, i64 n_kv_head, MatmulPrecision precision) {
  n_kv_head =
      check_attention(batch, seq, n_head, head_dim, n_kv_head, precision, "attention_forward");
  const i64 d = n_head * head_dim, kv = n_kv_head * head_dim;
  const i64 stride = d + 2 * kv;  // row stride of qkv: [q | k | v]
  const i64 g = n_head / n_kv_head;
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  const long long ss = static_cast<long long>(seq * seq);  // one head's score matrix
  const long long q_step = g * head_dim, p_step = g * ss;  // next group's member r
  for (i64 b = 0; b < batch; ++b) {
    const float* k = qkv + b * seq * stride + d;  // K/V head kh: + kh * head_dim
    for (i64 r = 0; r < g; ++r) {
      const float* q = qkv + b * seq * stride + r * head_dim;
      float* p = probs + b * n_head * ss + r * ss;  // head h: + h * seq * seq
      // S [seq, seq] = scale Q [seq, hd] K^T.
      gemm_rm_strided(blas_of(ctx), gemm_types(precision), false, true, seq, seq, head_dim, scale,
                      q, stride, q_step, k, stride, head_dim, 0.0f, p, seq, p_step, n_kv_head);
    }
  }
  const i64 rows = batch * n_head * seq;
  causal_softmax_kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream_of(ctx)>>>(probs, seq);
  PION_CUDA_CHECK_LAUNCH("causal_softmax_kernel");
  for (i64 b = 0; b < batch; ++b) {
    const float* v = qkv + b * seq * stride + d + kv;
    for (i64 r = 0; r < g; ++r) {
      const float* p = probs + b * n_head * ss + r * ss;
      // O [seq, hd] (columns h hd.. of out's [seq, d] rows) = P [seq, seq] V [seq, hd].
      gemm_rm_strided(blas_of(ctx), gemm_types(precision), false, false, seq, head_dim, seq, 1.0f,
                      p, seq, p_step, v, stride, head_dim, 0.0f, out + b * seq * d + r * head_dim,
                      d, q_step, n_kv_head);
    }
  }
}

void attention_backward(Context& ctx, float* dqkv, float* scratch, const float* dout,
                        const float* probs, const float* qkv, i64 batch, i64 seq, i64 n_head,
                        i64 head_dim, i64 n_kv_head, MatmulPrecision precision,
                        GradWrite dqkv_write) {
  n_kv_head =
      check_attention(batch, seq, n_head, head_dim, n_kv_head, precision, "attention_backward");
  // Assign: the first call into each part of dqkv (dQ's only call, dK's and dV's r = 0 call)
  // runs with beta = 0, so it neither needs a zeroed buffer nor reads one.
  const float first_beta = dqkv_write == GradWrite::Assign ? 0.0f : 1.0f;
  const i64 d = n_head * head_dim, kv = n_kv_head * head_dim;
  const i64 stride = d + 2 * kv;
  const i64 g = n_head / n_kv_head;
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  const long long ss = static_cast<long long>(seq * seq);
  const long long q_step = g * head_dim, p_step = g * ss;
  // out = P V: dP = dout V^T (into scratch), dV += P^T dout (summed over the group's members
  // in order r = 0..g-1, one accumulating call each).
  for (i64 b = 0; b < batch; ++b) {
    const float* v = qkv + b * seq * stride + d + kv;
    float* dv = dqkv + b * seq * stride + d + kv;
    for (i64 r = 0; r < g; ++r) {
      const float* go = dout + b * seq * d + r * head_dim;  // head h: + h * head_dim, ld d
      const float* p = probs + b * n_head * ss + r * ss;
      float* ds = scratch + b * n_head * ss + r * ss;
      // dP [seq, seq] = dO [seq, hd] V^T.
      gemm_rm_strided(blas_of(ctx), gemm_types(precision), false, true, seq, seq, head_dim, 1.0f,
                      go, d, q_step, v, stride, head_dim, 0.0f, ds, seq, p_step, n_kv_head);
      // dV [seq, hd] += P^T [seq, seq] dO [seq, hd].
      gemm_rm_strided(blas_of(ctx), gemm_types(precision), true, false, seq, head_dim, seq, 1.0f, p,
                      seq, p_step, go, d, q_step, r == 0 ? first_beta : 1.0f, dv, stride, head_dim,
                      n_kv_head);
    }
  }
  const i64 rows = batch * n_head * seq;
  causal_softmax_backward_kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream_of(ctx)>>>(
      scratch, probs, seq);
  PION_CUDA_CHECK_LAUNCH("causal_softmax_backward_kernel");
  // S = scale Q K^T: dQ += scale dS K, dK += scale dS^T Q (dK summed over the group as dV).
  for (i64 b = 0; b < batch; ++b) {
    const float* k = qkv + b * seq * stride + d;
    float* dk = dqkv + b * seq * stride + d;
    for (i64 r = 0; r < g; ++r) {
      const float* q = qkv + b * seq * stride + r * head_dim;
      float* dq = dqkv + b * seq * stride + r * head_dim;
      const float* ds = scratch + b * n_head * ss + r * ss;
      // dQ [seq, hd] += scale dS [seq, seq] K [seq, hd].
      gemm_rm_strided(blas_of(ctx), gemm_types(precision), false, false, seq, head_dim, seq, scale,
                      ds, seq, p_step, k, stride, head_dim, first_beta, dq, stride, q_step,
                      n_kv_head);
      // dK [seq, hd] += scale dS^T [seq, seq] Q [seq, hd].
      gemm_rm_strided(blas_of(ctx), gemm_types(precision), true, false, seq, head_dim, seq, scale,
                      ds, seq, p_step, q, stride, q_step, r == 0 ? first_beta : 1.0f, dk, stride,
                      head_dim, n_kv_head);
    }
  }
}

}  // namespace pion::cuda::layers
