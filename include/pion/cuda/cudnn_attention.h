#pragma once
// Causal multi-head attention through cuDNN's fused flash attention (its graph API, cuDNN 9):
// `--attention cudnn` of a bf16 model. The layout is flash_attention_forward_tc's with bf16
// in and out: qkv [batch, seq, (n_head + 2 n_kv_head) head_dim] rows [q | k | v] (after
// RoPE), out [batch, seq, n_head head_dim], and cuDNN's softmax statistics (the natural-log
// logsumexp of each query row's scaled scores, [batch, n_head, seq] fp32) kept from the forward
// for the backward. The backward writes dq, dk and dv in bf16 into a tensor of qkv's layout;
// a K/V head's gradient is the sum over the query heads of its group.
//
// One object per shape: the constructor builds both execution plans (cuDNN's heuristics pick
// the engines) and throws pion::Error with cuDNN's message when this GPU, cuDNN version or
// shape has no engine for them. forward and backward queue work on the Context's stream with
// no allocation and no host synchronisation (graph-capturable); the caller gives
// workspace_bytes() of device memory, shared by both.
//
// Built only where CMake found cuDNN (PION_HAVE_CUDNN); elsewhere cudnn_attention_available()
// says why not and the constructor throws that. The CPU emulator (tools/cuda-emu) has no cuDNN,
// so this code is checked only on a GPU (tests/test_cuda_cudnn_attention.cpp).
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "pion/cuda/runtime.h"

namespace pion::cuda::layers {

// Empty when this build has cuDNN's attention, else the reason ("built without cuDNN: ...").
std::string cudnn_attention_unavailable();

// Builds both operation graphs for this shape and has cuDNN finalise them, without a GPU and
// without choosing an engine: cuDNN checks every operation's shapes, types and connections.
// Throws pion::Error naming the graph (and cuDNN's message) it rejects, or the bad shape.
void cudnn_attention_validate_graphs(std::int64_t batch, std::int64_t seq, std::int64_t n_head,
                                     std::int64_t head_dim, std::int64_t n_kv_head);

class CudnnAttention {
 public:
  using i64 = std::int64_t;
  CudnnAttention(Context& ctx, i64 batch, i64 seq, i64 n_head, i64 head_dim, i64 n_kv_head);
  ~CudnnAttention();
  CudnnAttention(const CudnnAttention&) = delete;
  CudnnAttention& operator=(const CudnnAttention&) = delete;

  // Device bytes forward and backward need as scratch (the larger of the two plans').
  std::size_t workspace_bytes() const;
  // The engines cuDNN chose, for logs ("forward <name>, backward <name>").
  std::string description() const;

  // out_bf16 [batch, seq, n_head head_dim] and stats [batch, n_head, seq] from qkv_bf16.
  void forward(void* out_bf16, float* stats, const void* qkv_bf16, void* workspace);
  // dqkv_bf16 (qkv's layout; every element written) from dout_bf16 (the gradient of out), the
  // forward's out_bf16 and stats, and qkv_bf16.
  void backward(void* dqkv_bf16, const void* dout_bf16, const void* out_bf16, const float* stats,
                const void* qkv_bf16, void* workspace);

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace pion::cuda::layers
