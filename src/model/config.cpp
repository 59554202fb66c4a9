#include "pion/model/config.h"

#include <cmath>
#include <set>

#include "pion/core/error.h"

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
  ModelConfig c;
  try {
    c.vocab_size = object.at("vocab_size").get<int>();
    c.n_layer = object.at("n_layer").get<int>();
    c.n_head = object.at("n_head").get<int>();
    c.d_model = object.at("d_model").get<int>();
    c.seq_len = object.at("seq_len").get<int>();
    c.ffn_hidden = object.value("ffn_hidden", 0);
    c.dropout = object.value("dropout", 0.0);
    c.init = object.value("init", std::string("normal"));
    c.init_std = object.value("init_std", 0.02);
    c.rope_theta = object.value("rope_theta", 10000.0);
    c.norm_eps = object.value("norm_eps", 1e-5);
  } catch (const nlohmann::json::exception& e) {
    throw Error(std::string("model config: missing or mistyped key (") + e.what() + ")");
  }
  c.validate();
  return c;
}

}  // namespace pion
