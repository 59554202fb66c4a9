#include "pion/model/config.h"

#include <cmath>
#include <set>

#include "pion/core/error.h"
#include "pion/core/input.h"

namespace pion {

void ModelConfig::validate() const {
  auto need = [](bool ok, const std::string& msg) { check(ok, "model config: " + msg); };
  auto in_range = [&](int v, int hi, const char* key) {
    need(v > 0 && v <= hi, std::string(key) + " must lie in [1, " + std::to_string(hi) + "] (got " +
                               std::to_string(v) + ")");
  };
  in_range(vocab_size, kMaxVocab, "vocab_size");
  in_range(n_layer, kMaxLayers, "n_layer");
  in_range(n_head, kMaxHeads, "n_head");
  in_range(d_model, kMaxWidth, "d_model");
  need(d_model % n_head == 0, "d_model (" + std::to_string(d_model) +
                                  ") must be divisible by n_head (" + std::to_string(n_head) + ")");
  need(head_dim() % 2 == 0, "head_dim = d_model / n_head = " + std::to_string(head_dim()) +
                                " must be even for RoPE; change d_model or n_head");
  need(ffn_hidden >= 0 && ffn_hidden <= kMaxWidth,
       "ffn_hidden must lie in [0, " + std::to_string(kMaxWidth) +
           "] (0 picks 8/3 d_model rounded up to 32)");
  in_range(seq_len, kMaxSeqLen, "seq_len");
  need(dropout >= 0.0 && dropout < 1.0,
       "dropout must be in [0, 1) (got " + std::to_string(dropout) + ")");
  need(init == "normal" || init == "spectral",
       "init must be \"normal\" or \"spectral\" (got \"" + init + "\")");
  need(init_std > 0.0 && std::isfinite(init_std), "init_std must be positive and finite");
  need(rope_theta > 0.0 && std::isfinite(rope_theta), "rope_theta must be positive and finite");
  need(norm_eps > 0.0 && std::isfinite(norm_eps), "norm_eps must be positive and finite");
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
  const std::int64_t per_layer = 2 * d + 4 * d * d + 3 * f * d;
  return 2 * v * d + d + n_layer * per_layer;
}

nlohmann::json ModelConfig::to_json() const {
  return {{"vocab_size", vocab_size}, {"n_layer", n_layer},
          {"n_head", n_head},         {"d_model", d_model},
          {"ffn_hidden", ffn_size()}, {"seq_len", seq_len},
          {"dropout", dropout},       {"init", init},
          {"init_std", init_std},     {"rope_theta", rope_theta},
          {"norm_eps", norm_eps}};
}

ModelConfig ModelConfig::from_json(const nlohmann::json& object) {
  check(object.is_object(), "model config: expected a JSON object, got " + input::describe(object));
  static const std::set<std::string> keys = {"vocab_size", "n_layer",    "n_head",  "d_model",
                                             "ffn_hidden", "seq_len",    "dropout", "init",
                                             "init_std",   "rope_theta", "norm_eps"};
  for (const auto& [key, value] : object.items())
    check(keys.count(key) == 1, "model config: unknown key " + input::describe(key));
  // Typed reads with the limits of validate(): no narrowing, so 4294967297 is not 1.
  auto int_key = [&](const char* key, int lo, int hi) {
    return input::to_int32(input::member(object, key, "model config"), lo, hi,
                           std::string("model config key '") + key + "'");
  };
  auto real_key = [&](const char* key, double fallback) {
    return object.contains(key) ? input::to_double(object.at(key), -1e300, 1e300,
                                                   std::string("model config key '") + key + "'")
                                : fallback;
  };
  ModelConfig c;
  c.vocab_size = int_key("vocab_size", 1, kMaxVocab);
  c.n_layer = int_key("n_layer", 1, kMaxLayers);
  c.n_head = int_key("n_head", 1, kMaxHeads);
  c.d_model = int_key("d_model", 1, kMaxWidth);
  c.seq_len = int_key("seq_len", 1, kMaxSeqLen);
  c.ffn_hidden = object.contains("ffn_hidden") ? int_key("ffn_hidden", 0, kMaxWidth) : 0;
  c.dropout = real_key("dropout", 0.0);
  c.init = object.contains("init") ? input::to_string(object.at("init"), 16, "model config key 'init'")
                                   : std::string("normal");
  c.init_std = real_key("init_std", 0.02);
  c.rope_theta = real_key("rope_theta", 10000.0);
  c.norm_eps = real_key("norm_eps", 1e-5);
  c.validate();
  return c;
}

}  // namespace pion
