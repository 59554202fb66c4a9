#pragma once
// The LLaMA-style decoder on the CPU (llm.c style: hand-written forward and backward).
//
//   tokens -> tok_embedding -> n_layer x [x += drop(attn(rmsnorm(x))); x += drop(mlp(rmsnorm(x)))]
//          -> final_norm -> lm_head -> logits -> mean cross-entropy over targets >= 0
//
// attn: q, k, v = x Wq^T, x Wk^T, x Wv^T (no biases), RoPE on q and k, causal softmax per head,
// output projection Wo. With grouped-query attention (config.n_kv_head < n_head) k and v have
// n_kv_head heads and query head h uses K/V head h / (n_head / n_kv_head) (HF's repeat_kv).
// mlp: w_down(silu(w_gate x) * w_up x). RMSNorms have a learnable weight. With config.norm
// "none" every rmsnorm(.) above (and final_norm) is the identity and the three *_norm.weight
// parameters do not exist. With config.tie_embeddings the LM head is tok_embedding.weight
// (logits = h E^T) and its gradient is the lookup's plus the head's.
//
// Parameters live in ONE contiguous buffer and gradients in ONE buffer (params(), grads());
// every named parameter is a view into them, in this order (linear weights are [d_out, d_in]):
//   tok_embedding.weight [V, d]
//   layers.{i}.attn_norm.weight [d]
//   layers.{i}.attn.wq [d, d], .wk [kv, d], .wv [kv, d], .wo [d, d]
//                              (kv = n_kv_head * head_dim; wq, wk, wv adjacent: one fused GEMM)
//   layers.{i}.mlp_norm.weight [d]
//   layers.{i}.mlp.w_gate [f, d], layers.{i}.mlp.w_up [f, d]   (adjacent: one fused GEMM)
//   layers.{i}.mlp.w_down [d, f]
//   final_norm.weight [d]
//   lm_head.weight [V, d]                              (absent with tie_embeddings)
//
// Usage:
//   Llama<float> model(config); Rng rng(seed); model.init_weights(rng);
//   model.zero_grad();
//   double loss = model.forward(tokens, targets, B, T);   // keeps activations
//   model.backward(1.0 / grad_accum);                      // grads += d(scale * loss)/dparams
// T = double exists so gradients can be checked by finite differences; train with float.
#include <array>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "pion/core/random.h"
#include "pion/core/safetensors.h"
#include "pion/core/tensor.h"
#include "pion/model/config.h"
#include "pion/model/layers.h"
#include "pion/optim/optimizer.h"

namespace pion {

// One named parameter's place in the parameter buffer.
struct ParamEntry {
  std::string name;
  Shape shape;
  std::int64_t offset = 0;  // in elements
  std::int64_t numel() const { return shape_numel(shape); }
};
// The layout above for a validated config (the same for every element type and device).
std::vector<ParamEntry> llama_param_layout(const ModelConfig& config);
// The same entries, in the same order, placed by shape group instead of by layer: the token
// embedding; every layer's wq, wk, wv, wo; every layer's w_gate, w_up; every layer's w_down;
// the norm weights; the LM head. The adjacency the fused GEMMs need (wq|wk|wv, w_gate|w_up)
// is kept, and the matrices of one shape come out evenly spaced in one block (all four
// attention matrices when kv_dim = d_model), so a batched GEMM over a shape group can be
// strided-batched. The CUDA model keeps its device buffers in this order.
std::vector<ParamEntry> llama_param_layout_by_shape(const ModelConfig& config);
// Checks that `in` holds, under `prefix`, exactly the weights of a model of `config`: every
// parameter present with its shape, F32 or F64, every value finite, and no other tensor under
// the prefix. It allocates nothing sized by the config, so a checkpoint whose metadata claims
// a huge model is refused by comparing it with its (small) tensors first. `source` names the
// file in errors.
void check_model_weights(const TensorFile& in, const std::string& prefix, const ModelConfig& config,
                         const std::string& source);

template <class T>
class Llama {
 public:
  explicit Llama(const ModelConfig& config);  // validates; parameters start at zero

  const ModelConfig& config() const { return config_; }
  // Initialises every parameter as config().init says (see init.h).
  void init_weights(Rng& rng);

  // Runs the model on tokens [B, T] (row-major, values in [0, vocab_size)) and returns the mean
  // cross-entropy over targets >= 0 (negative targets are ignored; 0 when none is counted).
  // With empty targets only the logits are computed (returns 0; backward() is then an error).
  // Activation buffers are allocated once per (B, T) and reused.
  // With target_weights ([B*T], one per position): the loss is instead
  // sum_i target_weights[i] * (-log p(target_i)) over targets >= 0 (no mean), what an RL
  // objective's gradient is (pion/train/grpo.h); backward() then differentiates that sum.
  double forward(std::span<const std::int32_t> tokens, std::span<const std::int32_t> targets,
                 int batch, int seq, std::span<const double> target_weights = {});
  // After a forward() with targets: log p(target) of each position (0 where target < 0) and,
  // when `entropies` is not empty, the entropy of the softmax there (0 where target < 0),
  // both in double. RL computes its per-target weights from these before backward().
  void target_log_probs(std::span<double> log_probs, std::span<double> entropies = {}) const;
  // After a forward() with targets: switches its loss to the weighted sum above with these
  // weights (replacing any given to forward) and returns that loss; backward() uses them.
  double set_target_weights(std::span<const double> target_weights);
  // Adds d(loss_scale * loss)/dparams of the last forward() into grads().
  void backward(double loss_scale = 1.0);
  // Called by backward() right after layer l's gradients are final (layers run last to first),
  // so data-parallel training can start reducing them while earlier layers still compute.
  // Empty (the default): nothing is called.
  void set_layer_grads_ready_hook(std::function<void(int layer)> hook) {
    layer_grads_ready_ = std::move(hook);
  }
  // [B, T, vocab_size] logits of the last forward().
  const T* logits() const;
  // Targets counted by the last forward's loss.
  std::int64_t target_count() const { return target_count_; }

  void zero_grad();
  Tensor& params() { return params_; }
  Tensor& grads() { return grads_; }
  const std::vector<ParamEntry>& layout() const { return layout_; }
  // Every parameter with its gradient, as views into params() / grads(), in layout order.
  // The optimizers take fp32 Params (Llama<float>); Llama<double>'s views are F64.
  std::vector<Param> named_params();
  Tensor param(const std::string& name);  // throws pion::Error for an unknown name
  Tensor grad(const std::string& name);

  // Dropout is active only when training and config().dropout > 0. Masks are drawn from
  // dropout_rng() in a fixed order, so restoring its state() makes a resumed run bit-exact.
  void set_training(bool training) { training_ = training; }
  bool training() const { return training_; }
  Rng& dropout_rng() { return dropout_rng_; }
  const Rng& dropout_rng() const { return dropout_rng_; }

  // Adds every parameter to `out` as "<prefix><name>" (views: no copy).
  void save_weights(TensorFile& out, const std::string& prefix = "") const;
  // Copies every "<prefix><name>" from `in` (F32 or F64, converted as needed). Missing names or
  // wrong shapes throw pion::Error before anything is changed.
  void load_weights(const TensorFile& in, const std::string& prefix = "");

 private:
  // Pointers of one layer's parameters (or gradients) inside a flat buffer.
  struct LayerParams {
    T* attn_norm;
    T* wqkv;  // [d + 2 kv, d]: wq, wk, wv stacked
    T* wo;
    T* mlp_norm;
    T* w_gate_up;  // [2f, d]: w_gate, w_up stacked
    T* w_down;
  };
  struct Weights {
    T* tok_embedding;
    std::vector<LayerParams> layers;
    T* final_norm;
    T* lm_head;  // == tok_embedding with tied embeddings
  };
  // Activations of one layer kept for backward.
  struct LayerActs {
    T* x_in;                  // [N, d] residual entering the layer
    T* h1;                    // [N, d] attn_norm(x_in)
    T* rstd1;                 // [N]
    T* qkv;                   // [N, d + 2 kv] after RoPE on q and k
    T* probs;                 // [B, H, T, T] (H = n_head, also under GQA)
    T* att;                   // [N, d] attention output before wo
    T* x_mid;                 // [N, d] residual after the attention block
    T* h2;                    // [N, d] mlp_norm(x_mid)
    T* rstd2;                 // [N]
    T* gu;                    // [N, 2f] [gate | up]
    T* act;                   // [N, f] silu(gate) * up
    std::uint8_t* keep_attn;  // [N, d] dropout masks (when dropout is active)
    std::uint8_t* keep_mlp;
  };

  Weights weights_in(Tensor& buffer);
  void ensure_buffers(int batch, int seq);
  bool dropout_active() const { return training_ && config_.dropout > 0.0; }

  ModelConfig config_;
  std::vector<ParamEntry> layout_;
  Tensor params_, grads_;
  Weights w_, g_;
  layers::RopeTable<T> rope_;
  bool training_ = true;
  Rng dropout_rng_{0x5eed};

  // Per-(B, T) buffers.
  int batch_ = 0, seq_ = 0;
  std::vector<T> acts_;       // all forward activations
  std::vector<T> grad_acts_;  // activation gradients for one layer at a time
  std::vector<std::uint8_t> masks_;
  std::vector<LayerActs> layer_acts_;
  T* x_final_ = nullptr;  // [N, d] residual after the last layer
  T* h_final_ = nullptr;  // [N, d] final_norm output
  T* rstd_final_ = nullptr;
  T* logits_ = nullptr;        // [N, V]
  T* lse_ = nullptr;           // [N]
  T* scratch_proj_ = nullptr;  // [N, d] output projection before dropout / residual add

  std::vector<std::int32_t> tokens_, targets_;
  std::vector<double> target_weights_;  // empty: the mean cross-entropy
  bool have_loss_ = false;
  bool dropout_used_ = false;
  std::int64_t target_count_ = 0;
  std::function<void(int)> layer_grads_ready_;
};

extern template class Llama<float>;
extern template class Llama<double>;

}  // namespace pion
