#include "pion/model/config.h"

#include <cmath>
#include <limits>
#include <set>

#include "pion/core/error.h"
#include "pion/core/input.h"

namespace pion {

void ModelConfig::validate() const {
  auto need = [](bool ok, const std::string& msg) { check(ok, "model config: " + msg); };
  need(vocab_size > 0, "vocab_size must be positive (got " + std::to_string(vocab_size) + ")");
  need(n_layer > 0, "n_layer must be positive (got " + std::to_string(n_layer) + ")");
  need(n_head > 0, "n_head must be positive (got " + std::to_string(n_head) + ")");
  need(d_model > 0, "d_model must be positive (got " + std::to_string(d_model) + ")");
  need(d_model % n_head == 0, "d_model (" + std::to_string(d_model) +
                                  ") must be divisible by n_head (" + std::to_string(n_head) + ")");
  need(head_dim() % 2 == 0, "head_dim = d_model / n_head = " + std::to_string(head_dim()) +
                                " must be even for RoPE; change d_model or n_head");
  need(ffn_hidden >= 0, "ffn_hidden must be >= 0 (0 picks 8/3 d_model rounded up to 32)");
  need(seq_len > 0, "seq_len must be positive (got " + std::to_string(seq_len) + ")");
  need(dropout >= 0.0 && dropout < 1.0,
       "dropout must be in [0, 1) (got " + std::to_string(dropout) + ")");
  need(init == "normal" || init == "spectral",
       "init must be \"normal\" or \"spectral\" (got \"" + init + "\")");
  need(init_std > 0.0 && std::isfinite(init_std), "init_std must be positive and finite");
  need(rope_theta > 0.0, "rope_theta must be positive");
  need(norm_eps > 0.0, "norm_eps must be positive");
  // Upper bounds far above any model pion trains, so sizes (ffn_size(), num_params()) cannot
  // overflow and a garbage checkpoint config is refused before anything is allocated.
  const auto at_most = [&](int v, int hi, const char* key) {
    need(v <= hi, std::string(key) + " must be at most " + std::to_string(hi) + " (got " +
                      std::to_string(v) + ")");
  };
  at_most(vocab_size, kMaxVocab, "vocab_size");
  at_most(n_layer, kMaxLayers, "n_layer");
  at_most(d_model, kMaxWidth, "d_model");
  at_most(ffn_hidden, kMaxFfn, "ffn_hidden");
  at_most(seq_len, kMaxSeqLen, "seq_len");
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
  check(object.is_object(), "model config: expected a JSON object");
  static const std::set<std::string> keys = {"vocab_size", "n_layer",    "n_head",  "d_model",
                                             "ffn_hidden", "seq_len",    "dropout", "init",
                                             "init_std",   "rope_theta", "norm_eps"};
  for (const auto& [key, value] : object.items()) {
    check(keys.count(key) == 1, "model config: unknown key \"" + key + "\"");
  }
  // Typed, range-checked reads (pion/core/input.h): 1e30 or 1.7 for an int is an error.
  const auto get_int = [&](const char* key, bool required, int fallback) {
    const std::string where = std::string("model config key '") + key + "'";
    if (!object.contains(key)) {
      check(!required, "model config lacks the key '" + std::string(key) + "'");
      return fallback;
    }
    return input::to_int32(object[key], std::numeric_limits<int>::min(),
                           std::numeric_limits<int>::max(), where);
  };
  const auto get_double = [&](const char* key, double fallback) {
    if (!object.contains(key)) return fallback;
    return input::to_double(object[key], -std::numeric_limits<double>::max(),
                            std::numeric_limits<double>::max(),
                            std::string("model config key '") + key + "'");
  };
  ModelConfig c;
  c.vocab_size = get_int("vocab_size", true, 0);
  c.n_layer = get_int("n_layer", true, 0);
  c.n_head = get_int("n_head", true, 0);
  c.d_model = get_int("d_model", true, 0);
  c.seq_len = get_int("seq_len", true, 0);
  c.ffn_hidden = get_int("ffn_hidden", false, 0);
  c.dropout = get_double("dropout", 0.0);
  if (object.contains("init"))
    c.init = input::to_string(object["init"], 64, "model config key 'init'");
  c.init_std = get_double("init_std", 0.02);
  c.rope_theta = get_double("rope_theta", 10000.0);
  c.norm_eps = get_double("norm_eps", 1e-5);
  c.validate();
  return c;
}

}  // namespace pion
