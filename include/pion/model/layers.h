#pragma once
// The decoder's layers, llm.c style: plain row-major buffers, each layer's forward and
// backward side by side, no autograd. Templated on float (training) and double (so every
// backward can be checked against finite differences); both are instantiated in layers.cpp.
//
// Conventions
// - `n` is the number of token rows (B * T); a row of an activation is contiguous.
// - Linear weights are stored [d_out, d_in] like PyTorch's nn.Linear: out = in W^T.
// - Forward functions write their outputs. Backward functions ADD into every gradient they
//   produce (inputs and parameters), so callers zero gradient buffers first; the residual
//   stream's gradient then simply accumulates. Exception: rope_* work in place.
// - Matrix products go through gemm<T> (OpenBLAS, which threads them). Row-wise work uses
//   OpenMP only when it is large (see kMinParallelWork in layers.cpp for why).
#include <cstdint>
#include <vector>

#include "pion/core/random.h"

namespace pion::layers {

using i64 = std::int64_t;

// e^x in float, relative error below 3e-7, branch-free so loops over it vectorise: 0 below -87,
// saturates at e^88 above 88 (no inf), NaN stays NaN. The float path's softmaxes and SiLU use
// it; the double path uses std::exp.
float fast_exp(float x);

// ---- token embedding: out[i] = table[tokens[i]] (table [V, c], out [n, c]) ----------------
template <class T>
void embedding_forward(T* out, const std::int32_t* tokens, const T* table, i64 n, i64 c);
template <class T>
void embedding_backward(T* dtable, const T* dout, const std::int32_t* tokens, i64 n, i64 c);

// ---- RMSNorm: out = weight * x / sqrt(mean(x^2) + eps), per row of c; rstd [n] is kept ------
template <class T>
void rmsnorm_forward(T* out, T* rstd, const T* x, const T* weight, i64 n, i64 c, double eps);
template <class T>
void rmsnorm_backward(T* dx, T* dweight, const T* dout, const T* x, const T* weight, const T* rstd,
                      i64 n, i64 c);

// ---- linear without bias: out [n, d_out] = in [n, d_in] * weight[d_out, d_in]^T -------------
template <class T>
void linear_forward(T* out, const T* in, const T* weight, i64 n, i64 d_in, i64 d_out);
// din may be nullptr (the gradient of the first layer's input is not needed).
template <class T>
void linear_backward(T* din, T* dweight, const T* dout, const T* in, const T* weight, i64 n,
                     i64 d_in, i64 d_out);

// ---- rotary position embedding (LLaMA / HF "rotate half": pairs (i, i + head_dim/2)) ------
// Angle for position t and pair i: t * theta^(-2 i / head_dim), computed in double.
template <class T>
struct RopeTable {
  i64 seq_len = 0;
  i64 half = 0;        // head_dim / 2
  std::vector<T> cos;  // [seq_len, half]
  std::vector<T> sin;
};
template <class T>
RopeTable<T> make_rope_table(i64 seq_len, i64 head_dim, double theta);
// x holds B*T token rows, `row_stride` elements apart; each row starts with n_head heads of
// head_dim values (so q inside a fused [q | k | v] row uses row_stride = d + 2 kv, and k, at
// x + d, n_kv_head heads with the same stride). In place:
// forward rotates by +angle; backward applies the transpose (rotation by -angle) to a gradient.
template <class T>
void rope_forward(T* x, const RopeTable<T>& table, i64 batch, i64 seq, i64 n_head, i64 head_dim,
                  i64 row_stride);
template <class T>
void rope_backward(T* dx, const RopeTable<T>& table, i64 batch, i64 seq, i64 n_head, i64 head_dim,
                   i64 row_stride);

// ---- causal multi-head self-attention, grouped-query when n_kv_head < n_head ---------------
// qkv [batch, seq, d + 2 kv] rows [q | k | v], d = n_head * head_dim, kv = n_kv_head * head_dim
// (n_kv_head 0 means n_head: kv = d). Head h of q is columns [h head_dim, (h+1) head_dim) of
// the q part, K/V head g likewise of the k and v parts; query head h attends with K/V head
// h / (n_head / n_kv_head), as Hugging Face's repeat_kv. out [batch, seq, d] (heads
// concatenated). probs [batch, n_head, seq, seq]: the softmax of q k^T / sqrt(head_dim) with
// key j <= query i, zeros above the diagonal; kept for backward.
template <class T>
void attention_forward(T* out, T* probs, const T* qkv, i64 batch, i64 seq, i64 n_head, i64 head_dim,
                       i64 n_kv_head = 0);
// dqkv += gradient (a K/V head's gradient sums over the query heads of its group); scratch
// holds batch * n_head * seq * seq values (overwritten).
template <class T>
void attention_backward(T* dqkv, T* scratch, const T* dout, const T* probs, const T* qkv, i64 batch,
                        i64 seq, i64 n_head, i64 head_dim, i64 n_kv_head = 0);

// ---- SwiGLU: gu [n, 2 f] = [gate | up] (one fused GEMM), out [n, f] = silu(gate) * up ------
template <class T>
void swiglu_forward(T* out, const T* gu, i64 n, i64 f);
template <class T>
void swiglu_backward(T* dgu, const T* dout, const T* gu, i64 n, i64 f);

// ---- inverted dropout: out = in * keep / (1 - p) ---------------------------------------------
// Draws n uniforms from rng, in order, so a run with the same rng state is bit-identical.
void make_dropout_mask(std::uint8_t* keep, i64 n, double p, Rng& rng);
// out may alias in.
template <class T>
void dropout_forward(T* out, const T* in, const std::uint8_t* keep, i64 n, double p);
template <class T>
void dropout_backward(T* din, const T* dout, const std::uint8_t* keep, i64 n, double p);

// ---- cross-entropy with an ignore index ------------------------------------------------------
// Mean over rows whose target is >= 0 of logsumexp(logits) - logits[target]; rows with a
// negative target are ignored (e.g. prompt tokens). With no counted row the loss is 0 (and the
// gradient 0), not PyTorch's NaN. lse [n] is kept for backward; *count gets the counted rows.
// Throws pion::Error for a target >= v.
template <class T>
double cross_entropy_forward(T* lse, const T* logits, const std::int32_t* targets, i64 n, i64 v,
                             i64* count = nullptr);
// dlogits += dloss * d(mean loss)/dlogits.
template <class T>
void cross_entropy_backward(T* dlogits, const T* logits, const T* lse, const std::int32_t* targets,
                            i64 n, i64 v, double dloss);
// Per-row weights instead of the mean (RL objectives, pion/train/grpo.h): the loss is
// sum over rows with target >= 0 of weights[i] * (lse - logits[target]), and
// dlogits += dloss * weights[i] * (softmax - onehot(target)) on those rows. Weights are double
// so a Llama<double> gradient check keeps them exact.
template <class T>
double weighted_cross_entropy(const T* logits, const T* lse, const std::int32_t* targets,
                              const double* weights, i64 n, i64 v);
template <class T>
void weighted_cross_entropy_backward(T* dlogits, const T* logits, const T* lse,
                                     const std::int32_t* targets, const double* weights, i64 n,
                                     i64 v, double dloss);

}  // namespace pion::layers
