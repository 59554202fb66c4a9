#pragma once
// The shape of a LLaMA-style decoder: token embedding -> n_layer pre-norm blocks
// [x += attn(rmsnorm(x)); x += mlp(rmsnorm(x))] -> final RMSNorm -> untied LM head (norm
// "none": the same without any RMSNorm).
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>

namespace pion {

// Upper bounds on a model's shape, far above anything pion trains on a CPU and low enough that
// sizes computed from them never overflow 64-bit arithmetic. A config file, a flag or a
// checkpoint's metadata asking for more is refused by name (ModelConfig::validate and
// TrainConfig::validate); what a batch of a valid shape needs is checked against the machine by
// check_batch_memory (pion/model/memory.h).
inline constexpr int kMaxLayers = 1024;
inline constexpr int kMaxHeads = 1024;
inline constexpr int kMaxDModel = 65536;
inline constexpr int kMaxFfnHidden = 262144;  // 4 x kMaxDModel
inline constexpr int kMaxSeqLen = 1 << 20;
inline constexpr int kMaxVocab = 65536;  // token ids are stored as uint16
inline constexpr std::int64_t kMaxParams = std::int64_t{1} << 36;

struct ModelConfig {
  int vocab_size = 0;
  int n_layer = 0;
  int n_head = 0;
  int d_model = 0;
  int ffn_hidden = 0;           // 0 = the multiple of 32 nearest above 8/3 d_model (see ffn_size())
  int seq_len = 0;              // the longest sequence forward() accepts (the RoPE table length)
  double dropout = 0.0;         // on the attention and MLP outputs, before the residual add
  std::string init = "normal";  // normal | spectral (see init.h)
  double init_std = 0.02;       // std of the normal init, and of embeddings under spectral
  double rope_theta = 10000.0;
  double norm_eps = 1e-5;
  // rmsnorm | none. none removes every RMSNorm (before attention, before the MLP and the final
  // one) together with its weight: the normalisation-free model the Pion paper trains, since
  // Pion keeps every matrix's spectral norm fixed.
  std::string norm = "rmsnorm";
  // Grouped-query attention: the number of key/value heads, dividing n_head (each K/V head
  // serves n_head / n_kv_head query heads). 0 means n_head (multi-head attention).
  int n_kv_head = 0;
  // The LM head reuses the token embedding matrix (logits = h E^T): one parameter, trained by
  // AdamW under every optimizer, as in LLaMA-3.2, Gemma and GPT-2.
  bool tie_embeddings = false;

  // Throws pion::Error naming the field for any invalid value (e.g. d_model % n_head != 0).
  void validate() const;
  int head_dim() const { return d_model / n_head; }
  int kv_heads() const { return n_kv_head > 0 ? n_kv_head : n_head; }
  int kv_dim() const { return kv_heads() * head_dim(); }  // rows of wk and of wv
  bool has_norm() const { return norm == "rmsnorm"; }
  // The MLP hidden width actually used: ffn_hidden, or the 8/3 d_model rule when it is 0.
  int ffn_size() const;
  // Number of scalar parameters.
  std::int64_t num_params() const;

  // For checkpoint metadata. from_json rejects unknown keys and re-validates.
  nlohmann::json to_json() const;
  static ModelConfig from_json(const nlohmann::json& object);
};

}  // namespace pion
