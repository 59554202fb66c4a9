#include "pion/model/config.h"

#include <cmath>
#include <set>

#include "pion/core/error.h"
#include "pion/core/input.h"

namespace pion {

void ModelConfig::validate() const {
  auto need = [](bool ok, const std::string& msg) { check(ok, "model config: " + msg); };
  auto in_range = [&need](int v, int lo, int hi, const char* key, const std::string& hint = "") {
    need(v >= lo && v <= hi, std::string(key) + " must be an integer in [" + std::to_string(lo) +
                                 ", " + std::to_string(hi) + "] (got " + std::to_string(v) + ")" +
                                 hint);
  };
  in_range(vocab_size, 1, kMaxVocab, "vocab_size");
  in_range(n_layer, 1, kMaxLayers, "n_layer");
  in_range(n_head, 1, kMaxHeads, "n_head");
  in_range(d_model, 1, kMaxDModel, "d_model");
  need(d_model % n_head == 0, "d_model (" + std::to_string(d_model) +
                                  ") must be divisible by n_head (" + std::to_string(n_head) + ")");
  need(head_dim() % 2 == 0, "head_dim = d_model / n_head = " + std::to_string(head_dim()) +
                                " must be even for RoPE; change d_model or n_head");
  in_range(n_kv_head, 0, kMaxHeads, "n_kv_head", "; 0 means n_head");
  need(n_head % kv_heads() == 0, "n_kv_head (" + std::to_string(kv_heads()) +
                                     ") must divide n_head (" + std::to_string(n_head) + ")");
  in_range(ffn_hidden, 0, kMaxFfnHidden, "ffn_hidden", "; 0 picks 8/3 d_model rounded up to 32");
  in_range(seq_len, 1, kMaxSeqLen, "seq_len");
  need(std::isfinite(dropout) && dropout >= 0.0 && dropout < 1.0,
       "dropout must be in [0, 1) (got " + std::to_string(dropout) + ")");
  need(init == "normal" || init == "spectral",
       "init must be \"normal\" or \"spectral\" (got " + input::describe(init) + ")");
  need(init_std > 0.0 && std::isfinite(init_std), "init_std must be positive and finite");
  need(rope_theta > 0.0 && std::isfinite(rope_theta), "rope_theta must be positive and finite");
  need(norm_eps > 0.0 && std::isfinite(norm_eps), "norm_eps must be positive and finite");
  need(norm == "rmsnorm" || norm == "none",
       "norm must be \"rmsnorm\" or \"none\" (got " + input::describe(norm) + ")");
  need(num_params() <= kMaxParams,
       "the model would have " + std::to_string(num_params()) + " parameters, more than pion's " +
           std::to_string(kMaxParams) + "; lower n_layer, d_model or vocab_size");
}

int ModelConfig::ffn_size() const {
  if (ffn_hidden > 0) return ffn_hidden;
  // ceil(8 d / 3 / 32) * 32 in integers: 8 d / 96 rounded up, times 32.
  return (8 * d_model + 95) / 96 * 32;
}

std::int64_t ModelConfig::num_params() const {
  const std::int64_t v = vocab_size, d = d_model, f = ffn_size();
  const std::int64_t norm_weights = has_norm() ? d : 0;  // per RMSNorm
  const std::int64_t kv = kv_dim();
  const std::int64_t per_layer = 2 * norm_weights + 2 * d * d + 2 * kv * d + 3 * f * d;
  const std::int64_t embeddings = (tie_embeddings ? 1 : 2) * v * d;
  return embeddings + norm_weights + n_layer * per_layer;
}

nlohmann::json ModelConfig::to_json() const {
  return {{"vocab_size", vocab_size}, {"n_layer", n_layer},
          {"n_head", n_head},         {"d_model", d_model},
          {"ffn_hidden", ffn_size()}, {"seq_len", seq_len},
          {"dropout", dropout},       {"init", init},
          {"init_std", init_std},     {"rope_theta", rope_theta},
          {"norm_eps", norm_eps},     {"norm", norm},
          {"n_kv_head", kv_heads()},  {"tie_embeddings", tie_embeddings}};
}

ModelConfig ModelConfig::from_json(const nlohmann::json& object) {
  check(object.is_object(), "model config: expected a JSON object");
  static const std::set<std::string> keys = {"vocab_size", "n_layer",    "n_head",  "d_model",
                                             "ffn_hidden", "seq_len",    "dropout", "init",
                                             "init_std",   "rope_theta", "norm_eps",
                                             "norm",       "n_kv_head",  "tie_embeddings"};
  for (const auto& [key, value] : object.items()) {
    check(keys.count(key) == 1, "model config: unknown key " + input::describe(key));
  }
  // Typed, range-checked reads (a checkpoint's metadata is external input): an int given as
  // 4294967297 or 1.7 is an error, not a narrowed value.
  const std::string where = "model config key ";
  auto int_key = [&](const char* key, int lo, int hi) {
    return input::to_int32(input::member(object, key, "model config"), lo, hi,
                           where + "'" + key + "'");
  };
  auto real_key = [&](const char* key, double fallback, double lo, double hi, bool lo_open,
                      bool hi_open) {
    auto it = object.find(key);
    if (it == object.end()) return fallback;
    return input::to_double(*it, lo, hi, where + "'" + key + "'", lo_open, hi_open);
  };
  ModelConfig c;
  c.vocab_size = int_key("vocab_size", 1, kMaxVocab);
  c.n_layer = int_key("n_layer", 1, kMaxLayers);
  c.n_head = int_key("n_head", 1, kMaxHeads);
  c.d_model = int_key("d_model", 1, kMaxDModel);
  c.seq_len = int_key("seq_len", 1, kMaxSeqLen);
  c.ffn_hidden = object.contains("ffn_hidden") ? int_key("ffn_hidden", 0, kMaxFfnHidden) : 0;
  c.dropout = real_key("dropout", 0.0, 0.0, 1.0, false, true);
  if (object.contains("init")) c.init = input::to_string(object.at("init"), 64, where + "'init'");
  c.init_std = real_key("init_std", 0.02, 0.0, 1e6, true, false);
  c.rope_theta = real_key("rope_theta", 10000.0, 0.0, 1e12, true, false);
  c.norm_eps = real_key("norm_eps", 1e-5, 0.0, 1.0, true, false);
  // Absent in checkpoints written before the option existed: those models have RMSNorm.
  if (object.contains("norm")) c.norm = input::to_string(object.at("norm"), 64, where + "'norm'");
  // Absent in checkpoints written before GQA and tied embeddings existed: MHA, untied.
  if (object.contains("n_kv_head")) c.n_kv_head = int_key("n_kv_head", 0, kMaxHeads);
  if (object.contains("tie_embeddings")) {
    const nlohmann::json& t = object.at("tie_embeddings");
    check(t.is_boolean(), "model config key 'tie_embeddings' must be true or false");
    c.tie_embeddings = t.get<bool>();
  }
  c.validate();
  return c;
}

}  // namespace pion
