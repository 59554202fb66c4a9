#pragma once
// The LLaMA-style decoder on the GPU: pion/model/llama.h's model (same parameter layout,
// names, shapes and maths) built from the device layers of pion/cuda/layers.h, with fp32
// master weights and gradients in ONE device buffer each (so the optimizers, the gradient
// norm and a checkpoint see one flat array, as on the CPU).
//
//   tokens -> embedding -> n_layer x [x += attn(rmsnorm(x)); x += mlp(rmsnorm(x))]
//          -> rmsnorm -> lm_head -> fused softmax cross-entropy (+ its gradient)
//
// GEMMs run in the precision asked for (bf16 tensor cores with fp32 accumulation by
// default; tf32; or fp32 for parity with the CPU). Attention is either the materialised
// version (scores [B, H, T, T] kept for backward) or the fused flash version (online
// softmax; only a logsumexp per row is kept), picked by CudaAttention.
//
// Grouped-query attention (n_kv_head < n_head: wk, wv [kv_dim, d], qkv rows d + 2 kv_dim wide,
// RoPE over n_head query and n_kv_head key heads) runs in both attention versions. With
// tie_embeddings the LM head is tok_embedding (the layout has no lm_head): its gradient is the
// head's weight gradient plus the lookup gradient, added into one buffer in a fixed order.
//
// Dropout is not implemented on the GPU: a config with dropout > 0 is rejected.
//
// Host C++ without CUDA types; built into pion_gpu (cuda/model/llama_cuda.cpp) only when the
// CUDA back end is. Every call queues work on the Context's stream; the calls that return
// host values (read_loss, grad_norm) and the copies synchronise.
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <vector>

#include "pion/cuda/layers.h"
#include "pion/model/config.h"
#include "pion/model/llama.h"

namespace pion::cuda {

// Flash: fused attention (pion/cuda/flash_attention.h), on bf16 tensor cores when the GEMMs are
// bf16 (flash_attention_forward_tc / _backward_tc), fp32 otherwise. Materialized: the T x T
// scores through cuBLAS (pion/cuda/layers.h). Cudnn: cuDNN's fused flash attention
// (pion/cuda/cudnn_attention.h), bf16 GEMMs only, where the build found cuDNN; its backward
// writes the bf16 dqkv directly and RoPE's backward rotates it in place.
enum class CudaAttention { Materialized, Flash, Cudnn };

// "flash", "materialized" or "cudnn", for logs.
const char* attention_name(CudaAttention attention);

struct CudaLlamaOptions {
  layers::MatmulPrecision matmul = layers::MatmulPrecision::Bf16;
  CudaAttention attention = CudaAttention::Flash;
  // forward_backward replays a CUDA graph of its kernels (one graph launch instead of a few
  // hundred kernel launches) from the second call with a shape and loss scale on; the first
  // runs eagerly (CUDA loads kernels lazily, a capture must not). false: always eager.
  bool graphs = true;
};

// "bf16" | "tf32" | "fp32".
layers::MatmulPrecision parse_matmul_precision(const std::string& name);
// "flash" | "materialized" | "cudnn" | "auto". cudnn needs bf16 GEMMs and a build with cuDNN
// (an error naming what is missing otherwise); auto never picks it until a GPU has timed it
// against flash (scripts/gpu-train.sh times all three). With bf16 GEMMs auto is flash, the
// tensor-core kernels: at GPT-2 small (16 x 1024 tokens) the emulator counts 64 GB of traffic for
// an AdamW step with them against 174 GB with the scores materialised (docs/BENCHMARKS.md). The T x
// T fp32 scores and probabilities alone take 34 ms at an H100's bandwidth, while the fused kernels'
// products (about 1.5 TFLOP of bf16, estimated from the shapes) take 15 ms even at a tenth of its
// tensor-core peak; and no layer keeps its probabilities (9.7 GB there). With tf32 or fp32
// GEMMs the flash kernel runs on CUDA cores, so auto keeps the scores (TF32 cuBLAS GEMMs and
// memory-bound softmax passes) while every layer's [batch, heads, seq, seq] probabilities
// together take at most a quarter of the GPU's memory, and switches to flash beyond (long
// contexts). Neither rule has been timed on a GPU yet: scripts/gpu-train.sh times auto beside
// --attention flash and materialized.
CudaAttention choose_attention(const std::string& name, const ModelConfig& config, int batch,
                               layers::MatmulPrecision matmul);

class CudaLlama {
 public:
  // Validates the config (dropout must be 0); parameters start at zero on the device.
  CudaLlama(Context& ctx, const ModelConfig& config, const CudaLlamaOptions& options);
  ~CudaLlama();
  CudaLlama(const CudaLlama&) = delete;
  CudaLlama& operator=(const CudaLlama&) = delete;

  const ModelConfig& config() const { return config_; }
  const CudaLlamaOptions& options() const { return options_; }
  // The stream every call of this model queues on (a CudaDecoder over it uses it too).
  Context& context() const { return ctx_; }
  const std::vector<ParamEntry>& layout() const { return layout_; }
  std::int64_t num_params() const { return num_params_; }

  // The device buffers (num_params() floats each) in layout() order, which is
  // llama_param_layout_by_shape: the matrices of one shape sit evenly spaced, so the GPU
  // optimizers' batched GEMMs over a shape group are strided-batched.
  float* params();
  float* grads();
  // Synchronous copies of the whole buffers (host spans of num_params() floats), e.g. from
  // and to a Llama<float>'s params() for initialisation, checkpoints and evaluation. The host
  // side is in llama_param_layout order (the CPU model's); the copies reorder.
  void upload_params(std::span<const float> host);

  // With Bf16 matmuls the GEMMs read a bf16 copy of the weights, made by one conversion pass
  // at the start of forward_backward (not one per GEMM call). By default every
  // forward_backward makes it, since params() may have been written through its pointer since
  // the last call. A caller that reports every such write (weights_changed(): after each
  // optimizer step) can turn tracking on: the copy is then made only on the first
  // forward_backward after a change (upload_params counts as one), i.e. once per optimizer
  // step however many micro-batches accumulate. No effect at other precisions.
  void track_weight_changes(bool on);
  void weights_changed();
  void download_params(std::span<float> host) const;
  void download_grads(std::span<float> host) const;

  // Runs the model on tokens [batch, seq] (uploaded; values checked on the host: tokens in
  // [0, vocab), targets < vocab, negative targets ignored) and the fused cross-entropy. With
  // loss_scale != 0 it then runs backward and ADDS d(loss_scale * mean loss)/dparams into
  // grads(); with loss_scale == 0 it is forward only (evaluation). The loss stays on the
  // device until read_loss(). With options().graphs the pass after the token upload (and the
  // bf16 weight refresh) is a CUDA graph per (batch, seq, loss_scale), captured on the
  // second call with them and replayed after; a new shape drops the graphs with the buffers
  // they point into. If a capture fails, the model says so once and stays eager.
  void forward_backward(std::span<const std::int32_t> tokens, std::span<const std::int32_t> targets,
                        int batch, int seq, double loss_scale);
  // How many forward_backward calls replayed a graph, and how many graphs were captured.
  using GraphCounts = GraphReplayer::Counts;
  GraphCounts graph_counts() const;
  struct Loss {
    double loss = 0.0;       // mean over counted targets
    std::int64_t count = 0;  // targets counted
  };
  // The last forward_backward's loss (synchronises the stream).
  Loss read_loss();

  // RL's objective path (pion/train/backend.h's TargetObjective), as the CPU model's
  // forward / target_log_probs / set_target_weights / backward:
  //   forward_backward(tokens, targets, batch, seq, 0.0)    forward only, activations kept
  //   target_log_probs(log_probs, entropies)                 [batch * seq] to the host
  //   weighted_backward(weights, loss_scale)                 ADDS the weighted loss's gradient
  // The plain mean cross-entropy (forward_backward with loss_scale != 0) does none of this.
  //
  // log p(target) and the softmax's entropy at every position of the last forward_backward (0
  // where the target is < 0), computed on the device and copied back in double (synchronises):
  // the log-prob as the double difference of the fp32 logit and logsumexp, exactly as the CPU
  // model forms it, because the PPO ratio exp(logp - logp_old) and the k3 KL exponentiate
  // differences of these (an fp32 result would add ~1e-7 relative noise to each); the copy is
  // 16 bytes per position beside the 4 x vocab of the logits. entropies may be empty.
  void target_log_probs(std::span<double> log_probs, std::span<double> entropies = {});
  // After a forward-only forward_backward (loss_scale 0), at most once: backward of
  // loss_scale * sum_i weights[i] * (-log p(target_i)) over the positions with a target >= 0
  // (weights [batch * seq], uploaded), i.e. dlogits_i = loss_scale w_i (softmax_i -
  // onehot(target_i)); ADDS into grads() like forward_backward.
  void weighted_backward(std::span<const double> weights, double loss_scale);

  void zero_grad();
  // sqrt(sum of squared gradients) over the whole buffer, in double (synchronises). Non-finite
  // when any gradient is NaN or Inf.
  double grad_norm();
  // grads() *= factor (gradient clipping).
  void scale_grads(float factor);

  // Bytes of device memory this model holds (parameters, gradients, activations, scratch).
  std::size_t device_bytes() const;

  struct Impl;

 private:
  Context& ctx_;
  ModelConfig config_;
  CudaLlamaOptions options_;
  std::vector<ParamEntry> layout_;
  std::int64_t num_params_ = 0;
  std::unique_ptr<Impl> impl_;
};

}  // namespace pion::cuda
