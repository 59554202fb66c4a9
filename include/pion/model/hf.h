#pragma once
// The Hugging Face `LlamaForCausalLM` layout, as far as pion's model can express it: the
// config.json fields and the tensor names. Reading and writing the files themselves (the
// safetensors shards, the tokenizer, pion's checkpoint) is pion/train/hf_checkpoint.h.
//
// Our model is the same function as HF's LLaMA: RMSNorm weight * x / sqrt(mean(x^2) + eps),
// rotate-half RoPE with inv_freq = theta^(-2i/head_dim) (so q and k need no permutation),
// grouped-query attention by repeating K/V heads, a SiLU-gated MLP, a tied or untied LM head.
// What it cannot express (another architecture, RoPE scaling, biases, another activation, a
// head_dim other than hidden_size / num_attention_heads, norm "none") is refused by name.
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "pion/model/config.h"

namespace pion::hf {

// What a config.json says beyond the ModelConfig: informative fields kept for the report.
struct HfConfig {
  ModelConfig model;
  std::string torch_dtype;  // "" when absent
  int bos_token_id = -1;    // -1 when absent or null
  int eos_token_id = -1;
};

// Reads a LlamaForCausalLM config.json (`source` names it in errors). Every field that changes
// the model's function is checked against what pion implements; an unknown field, another
// architecture, rope_scaling, biases, hidden_act other than silu, a head_dim that is not
// hidden_size / num_attention_heads, a vocabulary over 65536 are each refused by name.
// max_position_embeddings becomes seq_len, capped at `seq_len_cap` when that is > 0.
HfConfig config_from_hf(const nlohmann::json& config, const std::string& source,
                        int seq_len_cap = 0);

// The config.json of `model` (refuses norm "none", which HF LLaMA cannot express). torch_dtype
// is "float32", "bfloat16" or "float16"; bos/eos < 0 are written as null.
nlohmann::json config_to_hf(const ModelConfig& model, const std::string& torch_dtype,
                            int bos_token_id = -1, int eos_token_id = -1);

// The HF tensor name of a pion parameter name (llama.h's layout: "layers.3.attn.wq" ->
// "model.layers.3.self_attn.q_proj.weight"); an unknown name is an error. Tied models have no
// lm_head parameter, and HF files of tied models usually omit lm_head.weight too.
std::string tensor_name(const std::string& pion_name);

}  // namespace pion::hf
