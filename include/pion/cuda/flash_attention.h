#pragma once
// Fused causal multi-head (or grouped-query) self-attention on the GPU ("flash attention":
// online softmax, tiles of queries and keys in shared memory), the long-context alternative to
// attention_forward / attention_backward of pion/cuda/layers.h. Same layout and semantics, but
// the seq x seq scores are never materialised: forward keeps only the per-row logsumexp (lse),
// and backward recomputes the probabilities tile by tile from it. Memory is O(batch n_head seq)
// instead of O(batch n_head seq^2).
//
// flash_attention_forward / _backward: fp32 throughout (inputs, outputs and arithmetic on
// CUDA cores); flash_attention_forward_tc / _backward_tc: the products on bf16 tensor cores,
// the rest fp32 (below). CudaLlama runs the _tc pair when its GEMMs are bf16.
// Conventions of layers.h: kernels are queued on the Context's stream with no allocation, no
// host synchronisation and no device-to-host copy (graph-capturable); argument checks throw
// pion::Error on the host before anything is queued; backward ADDS into dqkv (callers zero
// it first) unless asked to assign it. Deterministic: every sum has a fixed order and there are no
// float atomics (dK and dV are computed per key tile looping over query tiles, dQ per query tile
// looping over key tiles), so the same inputs give the same bits on every run.
//
// Supported head_dim: 1..128 (kernels are compiled for 32, 64 and 128 columns; a smaller
// head_dim runs the next size up with the unused columns masked).
//
// Plain C++17 with no CUDA types; the kernels live in cuda/model/flash_attention.cu.
#include <cstddef>
#include <cstdint>

#include "pion/cuda/layers.h"
#include "pion/cuda/runtime.h"

namespace pion::cuda::layers {

// Elements of flash_attention_forward's lse buffer: batch * n_head * seq.
std::size_t flash_attention_lse_elements(i64 batch, i64 seq, i64 n_head);
// Elements of flash_attention_backward's scratch buffer: batch * n_head * seq (the row dots
// D_i = sum_c dout[i, c] out[i, c] per head).
std::size_t flash_attention_scratch_elements(i64 batch, i64 seq, i64 n_head);

// qkv [batch, seq, d + 2 kv] rows [q | k | v] (d = n_head * head_dim query columns, kv =
// n_kv_head * head_dim key and value columns each, RoPE already applied; head h in columns
// [h head_dim, (h+1) head_dim) of its part); out [batch, seq, d] (heads concatenated) =
// softmax(q k^T / sqrt(head_dim), key j <= query i) v, where query head h uses K/V head
// h / (n_head / n_kv_head) (grouped-query attention; n_kv_head must divide n_head, and
// n_kv_head 0 or n_head is multi-head attention); lse [batch, n_head, seq] = per-row
// logsumexp of those scaled, masked scores (kept for backward).
// out_bf16 (optional, __nv_bfloat16 device memory like out's shape): out rounded to bf16 (nearest
// even) as well, for a bf16 GEMM reading the attention output (layers.h); out is still
// written (the backward reads it).
void flash_attention_forward(Context& ctx, float* out, float* lse, const float* qkv, i64 batch,
                             i64 seq, i64 n_head, i64 head_dim, i64 n_kv_head = 0,
                             void* out_bf16 = nullptr);

// The same forward on bf16 tensor cores (nvcuda::wmma 16 x 16 x 16 tiles; cuda/model/
// flash_attention_tc.cu): q, k and v are rounded to bf16 on their way into shared memory and
// the probabilities to bf16 for the P V product; scores, softmax, accumulation and outputs
// stay fp32. Same arguments, layout, head_dim range and conventions as above. Differs from
// the fp32 forward by the bf16 rounding of its inputs and probabilities: against an exact
// attention of the rounded q, k, v, each output moves by at most about 2^-9 max |v|. out may be
// null when out_bf16 is given: then only the bf16 output is written (a bf16 model keeps no
// fp32 attention output; the backward reads the bf16 one). qkv_bf16 (optional): qkv stored in
// bf16 (a bf16 GEMM's output, RoPE applied by rope_forward_bf16), read instead of qkv (then
// nullptr) as it is: the same bits as the fp32 qkv those bf16 values widen to.
void flash_attention_forward_tc(Context& ctx, float* out, float* lse, const float* qkv, i64 batch,
                                i64 seq, i64 n_head, i64 head_dim, i64 n_kv_head = 0,
                                void* out_bf16 = nullptr, const void* qkv_bf16 = nullptr);

// The backward on bf16 tensor cores, with flash_attention_backward's arguments and semantics:
// q, k, v and dout rounded to bf16 on their way into shared memory, the probabilities and their
// gradients (P, dS) rounded to bf16 for the products that form dV, dK and dQ; the row dots,
// scores, softmax and accumulations fp32. Pairs with either forward (it reads out and lse).
// out may be null when out_bf16 (the forward's bf16 output) is given: the row dots
// delta_i = dout_i . out_i then read it, which moves delta by at most 2^-9 sum_c |dout_ic out_ic|.
// dout_bf16 and qkv_bf16 (optional, together): dout and qkv stored in bf16 (a bf16 model's wo
// GEMM din and its qkv), read instead of dout and qkv (then nullptr): the same bits as the fp32
// tensors those values widen to. dqkv stays fp32.
void flash_attention_backward_tc(Context& ctx, float* dqkv, float* scratch, const float* dout,
                                 const float* out, const float* lse, const float* qkv, i64 batch,
                                 i64 seq, i64 n_head, i64 head_dim, i64 n_kv_head = 0,
                                 GradWrite dqkv_write = GradWrite::Add,
                                 const void* out_bf16 = nullptr, const void* dout_bf16 = nullptr,
                                 const void* qkv_bf16 = nullptr);

// dqkv [batch, seq, d + 2 kv] += the gradient of the loss with respect to qkv, given dout (its
// gradient with respect to out) and the forward's out and lse; a K/V head's gradient is the
// sum over the query heads of its group (one fixed order, no atomics). scratch holds
// flash_attention_scratch_elements floats (overwritten). dqkv_write Assign: dqkv = the gradient
// (every element is written, nothing read: no zeroing pass before it).
void flash_attention_backward(Context& ctx, float* dqkv, float* scratch, const float* dout,
                              const float* out, const float* lse, const float* qkv, i64 batch,
                              i64 seq, i64 n_head, i64 head_dim, i64 n_kv_head = 0,
                              GradWrite dqkv_write = GradWrite::Add);

}  // namespace pion::cuda::layers
