#include "pion/model/hf.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <set>

#include "pion/core/error.h"
#include "pion/core/input.h"

namespace pion::hf {

namespace {

// Fields that do not change the function a LlamaForCausalLM computes (generation defaults,
// bookkeeping, training-time options at their inert values are checked separately below).
const std::set<std::string>& harmless_fields() {
  static const std::set<std::string> fields = {
      "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
      "initializer_range", "transformers_version", "use_cache", "torch_dtype", "dtype",
      "_name_or_path", "name_or_path", "output_attentions", "output_hidden_states",
      "return_dict", "torchscript", "use_bfloat16", "is_decoder", "is_encoder_decoder",
      "add_cross_attention", "tie_encoder_decoder", "chunk_size_feed_forward",
      "tokenizer_class", "prefix", "task_specific_params", "problem_type", "id2label",
      "label2id", "finetuning_task", "max_length", "min_length", "do_sample", "early_stopping",
      "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p",
      "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
      "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences",
      "output_scores", "return_dict_in_generate", "forced_bos_token_id",
      "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
      "suppress_tokens", "begin_suppress_tokens", "cross_attention_hidden_size",
      "pruned_heads", "use_return_dict"};
  return fields;
}

int token_id(const nlohmann::json& config, const char* key, const std::string& where) {
  auto it = config.find(key);
  if (it == config.end() || it->is_null()) return -1;
  // Some configs list several end tokens (LLaMA-3.1: [128001, 128008, 128009]); the first is
  // the one reported.
  const nlohmann::json& v = it->is_array() && !it->empty() ? it->front() : *it;
  if (!v.is_number_integer()) return -1;
  return input::to_int32(v, -1, 1 << 30, where + " field '" + key + "'");
}

}  // namespace

HfConfig config_from_hf(const nlohmann::json& config, const std::string& source, int seq_len_cap) {
  const std::string where = source;
  check(config.is_object(), where + " must be a JSON object");
  auto field = [&](const char* key) -> const nlohmann::json& {
    return input::member(config, key, where + " (a LlamaForCausalLM config.json needs it)");
  };
  auto has = [&](const char* key) { return config.contains(key) && !config.at(key).is_null(); };
  auto int_field = [&](const char* key, int lo, int hi) {
    return input::to_int32(field(key), lo, hi, where + " field '" + key + "'");
  };
  auto refuse = [&](const std::string& what) {
    throw Error(where + ": " + what + "; pion cannot import this model");
  };

  // The architecture first, so another model is refused by what it is, not by a field.
  check(config.contains("model_type"),
        where + " has no 'model_type'; is this a Hugging Face model directory?");
  const std::string model_type = input::to_string(config.at("model_type"), 64, where + " field 'model_type'");
  if (model_type != "llama")
    refuse("model_type " + input::describe(model_type) + " is not supported (pion imports "
           "LlamaForCausalLM, model_type \"llama\")");
  if (has("architectures")) {
    const nlohmann::json& a = config.at("architectures");
    check(a.is_array(), where + " field 'architectures' must be an array of names");
    for (const auto& name : a)
      if (!(name.is_string() && name.get<std::string>() == "LlamaForCausalLM"))
        refuse("architecture " + input::describe(name) +
               " is not supported (pion imports LlamaForCausalLM)");
  }

  static const std::set<std::string> model_fields = {
      "model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
      "num_attention_heads", "num_key_value_heads", "vocab_size", "max_position_embeddings",
      "rms_norm_eps", "rope_theta", "rope_parameters", "tie_word_embeddings", "hidden_act",
      "rope_scaling", "attention_bias", "mlp_bias", "head_dim", "pretraining_tp",
      "attention_dropout"};
  for (const auto& [key, value] : config.items())
    if (model_fields.count(key) == 0 && harmless_fields().count(key) == 0)
      refuse("field " + input::describe(key) + " is not one pion knows for LlamaForCausalLM and "
             "may change the model");

  HfConfig out;
  ModelConfig& m = out.model;
  const std::int64_t vocab = input::to_int(field("vocab_size"), 1, std::int64_t{1} << 40,
                                           where + " field 'vocab_size'");
  if (vocab > kMaxVocab)
    refuse("vocab_size " + std::to_string(vocab) + " exceeds " + std::to_string(kMaxVocab) +
           " (pion stores token ids as uint16, so e.g. LLaMA-3's 128256-token vocabulary does "
           "not fit)");
  m.vocab_size = static_cast<int>(vocab);
  m.d_model = int_field("hidden_size", 1, kMaxDModel);
  m.ffn_hidden = int_field("intermediate_size", 1, kMaxFfnHidden);
  m.n_layer = int_field("num_hidden_layers", 1, kMaxLayers);
  m.n_head = int_field("num_attention_heads", 1, kMaxHeads);
  m.n_kv_head = has("num_key_value_heads") ? int_field("num_key_value_heads", 1, kMaxHeads) : 0;
  const int positions = int_field("max_position_embeddings", 1, kMaxSeqLen);
  m.seq_len = seq_len_cap > 0 ? std::min(positions, seq_len_cap) : positions;
  m.norm_eps = has("rms_norm_eps") ? input::to_double(config.at("rms_norm_eps"), 0.0, 1.0,
                                                      where + " field 'rms_norm_eps'", true)
                                   : 1e-6;  // LlamaConfig's default
  m.rope_theta = 10000.0;                   // LlamaConfig's default
  if (has("rope_theta"))
    m.rope_theta = input::to_double(config.at("rope_theta"), 0.0, 1e12,
                                    where + " field 'rope_theta'", true);
  if (has("rope_parameters")) {
    // transformers >= 5 keeps rope_theta here, with rope_type "default" for plain RoPE.
    const nlohmann::json& r = config.at("rope_parameters");
    check(r.is_object(), where + " field 'rope_parameters' must be an object");
    for (const auto& [key, value] : r.items()) {
      if (key == "rope_theta") {
        m.rope_theta = input::to_double(value, 0.0, 1e12,
                                        where + " field 'rope_parameters.rope_theta'", true);
      } else if (key == "rope_type") {
        if (!(value.is_string() && value.get<std::string>() == "default"))
          refuse("rope_parameters.rope_type " + input::describe(value) +
                 " is RoPE scaling, which pion does not implement (only \"default\")");
      } else {
        refuse("rope_parameters field " + input::describe(key) + " is not implemented");
      }
    }
  }
  if (has("rope_scaling")) {
    const nlohmann::json& r = config.at("rope_scaling");
    std::string kind = input::describe(r);
    for (const char* key : {"rope_type", "type"})
      if (r.is_object() && r.contains(key)) kind = "of type " + input::describe(r.at(key));
    refuse("rope_scaling " + kind +
           " is not implemented (pion's RoPE is unscaled; only null is accepted)");
  }
  if (has("tie_word_embeddings"))
    m.tie_embeddings = input::to_bool(config.at("tie_word_embeddings"), where + " field 'tie_word_embeddings'");
  if (has("hidden_act")) {
    const std::string act = input::to_string(config.at("hidden_act"), 64, where + " field 'hidden_act'");
    if (act != "silu")
      refuse("hidden_act " + input::describe(act) + " is not implemented (pion's MLP is SiLU-gated)");
  }
  for (const char* bias : {"attention_bias", "mlp_bias"})
    if (has(bias) && input::to_bool(config.at(bias), where + " field '" + bias + "'"))
      refuse(std::string(bias) + " true is not implemented (pion's projections have no bias)");
  if (has("pretraining_tp") &&
      input::to_int(config.at("pretraining_tp"), 1, 1 << 20, where + " field 'pretraining_tp'") != 1)
    refuse("pretraining_tp other than 1 is not implemented");
  if (has("attention_dropout") &&
      input::to_double(config.at("attention_dropout"), 0.0, 1.0, where + " field 'attention_dropout'") != 0.0)
    refuse("attention_dropout other than 0 is not implemented");
  check(m.d_model % m.n_head == 0, where + ": hidden_size " + std::to_string(m.d_model) +
                                       " is not a multiple of num_attention_heads " +
                                       std::to_string(m.n_head));
  if (has("head_dim")) {
    const int head_dim = int_field("head_dim", 1, kMaxDModel);
    if (head_dim != m.d_model / m.n_head)
      refuse("head_dim " + std::to_string(head_dim) + " differs from hidden_size / " +
             "num_attention_heads = " + std::to_string(m.d_model / m.n_head) +
             " (pion's attention width is hidden_size)");
  }
  if (m.n_kv_head == m.n_head) m.n_kv_head = 0;  // pion's spelling of multi-head attention
  for (const char* key : {"torch_dtype", "dtype"})
    if (config.contains(key) && config.at(key).is_string())
      out.torch_dtype = input::to_string(config.at(key), 64, where + " field '" + key + "'");
  out.bos_token_id = token_id(config, "bos_token_id", where);
  out.eos_token_id = token_id(config, "eos_token_id", where);
  try {
    m.validate();
  } catch (const Error& e) {
    throw Error(where + ": " + e.what());
  }
  return out;
}

nlohmann::json config_to_hf(const ModelConfig& m, const std::string& torch_dtype,
                            int bos_token_id, int eos_token_id) {
  m.validate();
  check(m.has_norm(),
        "export-hf: this model has norm \"none\" (no RMSNorm), which Hugging Face's "
        "LlamaForCausalLM cannot express; only models with norm rmsnorm can be exported");
  auto id = [](int v) { return v >= 0 ? nlohmann::json(v) : nlohmann::json(nullptr); };
  return {{"architectures", {"LlamaForCausalLM"}},
          {"model_type", "llama"},
          {"hidden_size", m.d_model},
          {"intermediate_size", m.ffn_size()},
          {"num_hidden_layers", m.n_layer},
          {"num_attention_heads", m.n_head},
          {"num_key_value_heads", m.kv_heads()},
          {"head_dim", m.head_dim()},
          {"vocab_size", m.vocab_size},
          {"max_position_embeddings", m.seq_len},
          {"rms_norm_eps", m.norm_eps},
          {"rope_theta", m.rope_theta},
          {"rope_scaling", nullptr},
          {"tie_word_embeddings", m.tie_embeddings},
          {"hidden_act", "silu"},
          {"attention_bias", false},
          {"mlp_bias", false},
          {"attention_dropout", 0.0},
          {"pretraining_tp", 1},
          {"initializer_range", m.init_std},
          {"use_cache", true},
          {"bos_token_id", id(bos_token_id)},
          {"eos_token_id", id(eos_token_id)},
          {"torch_dtype", torch_dtype}};
}

std::string tensor_name(const std::string& n) {
  static const std::map<std::string, std::string> per_layer = {
      {"attn_norm.weight", "input_layernorm.weight"},
      {"attn.wq", "self_attn.q_proj.weight"},
      {"attn.wk", "self_attn.k_proj.weight"},
      {"attn.wv", "self_attn.v_proj.weight"},
      {"attn.wo", "self_attn.o_proj.weight"},
      {"mlp_norm.weight", "post_attention_layernorm.weight"},
      {"mlp.w_gate", "mlp.gate_proj.weight"},
      {"mlp.w_up", "mlp.up_proj.weight"},
      {"mlp.w_down", "mlp.down_proj.weight"}};
  if (n == "tok_embedding.weight") return "model.embed_tokens.weight";
  if (n == "final_norm.weight") return "model.norm.weight";
  if (n == "lm_head.weight") return "lm_head.weight";
  // layers.<i>.<rest>
  const std::size_t dot = n.rfind("layers.", 0) == 0 ? n.find('.', 7) : std::string::npos;
  const auto it = dot == std::string::npos ? per_layer.end() : per_layer.find(n.substr(dot + 1));
  check(it != per_layer.end(), "hf::tensor_name: unknown parameter " + input::describe(n));
  return "model." + n.substr(0, dot + 1) + it->second;
}

}  // namespace pion::hf
