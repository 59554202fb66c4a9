#include "pion/optim/factory.h"

#include <algorithm>
#include <map>

#include "pion/core/error.h"
#include "pion/core/input.h"
#include "pion/optim/adamw.h"
#include "pion/optim/muon.h"
#include "pion/optim/options_json.h"
#include "pion/optim/pion.h"

namespace pion {

namespace {

using nlohmann::json;

// Defaults for "lr", the one hyperparameter the optimizers' Options do not hold: torch's AdamW
// default, the Muon reference's default, and Pion's fp64 reference default (tests/reference).
constexpr double kAdamwLr = 1e-3;
constexpr double kMuonLr = 0.02;
constexpr double kPionLr = 0.01;

std::string join(const std::vector<std::string>& items, const std::string& sep) {
  std::string out;
  for (const std::string& s : items) out += (out.empty() ? "" : sep) + s;
  return out;
}

// "lr" (the one key the optimizers' Options do not hold) followed by the Options' fields.
template <class Options>
std::vector<std::string> config_keys() {
  std::vector<std::string> keys = {"lr"};
  for (std::string& k : option_names<Options>()) keys.push_back(std::move(k));
  return keys;
}

const std::map<std::string, std::vector<std::string>>& key_table() {
  static const std::map<std::string, std::vector<std::string>> table = {
      {"adamw", config_keys<AdamW::Options>()},
      {"muon", config_keys<Muon::Options>()},
      {"pion", config_keys<Pion::Options>()},
  };
  return table;
}

// Builds optimizer `Opt` from a config object: rejects a non-object and unknown keys, reads
// "lr" and every Options field present (typed and range-checked; an absent key keeps the
// default), and adds one param group. Every error names the key and lists the valid keys.
template <class Opt>
std::unique_ptr<Optimizer> make_from_config(const std::string& kind, double lr, const json& config,
                                            std::vector<Param> params) {
  const std::vector<std::string>& keys = optimizer_config_keys(kind);
  const std::string valid_keys = " (valid keys for " + kind + ": " + join(keys, ", ") + ")";
  if (!config.is_object()) {
    throw Error(kind + " config must be a JSON object such as {\"lr\": 0.01}, got " +
                input::describe(config) + valid_keys);
  }
  for (const auto& [key, value] : config.items()) {
    if (std::find(keys.begin(), keys.end(), key) == keys.end())
      throw Error(kind + " config: unknown key " + input::describe(key) + valid_keys);
  }
  const auto where = [&](const std::string& key) { return kind + " config: key '" + key + "'"; };
  typename Opt::Options o;
  try {
    if (auto it = config.find("lr"); it != config.end())
      lr = input::to_double(*it, 0.0, kUnbounded, where("lr"), false, true);
    read_options(config, o, false, where);
  } catch (const Error& e) {
    throw Error(std::string(e.what()) + valid_keys);
  }
  auto opt = std::make_unique<Opt>();
  try {
    opt->add_param_group(std::move(params), lr, o);
  } catch (const Error& e) {
    throw Error(kind + " config: " + e.what() + valid_keys);
  }
  return opt;
}

}  // namespace

const std::vector<std::string>& optimizer_kinds() {
  static const std::vector<std::string> kinds = {"adamw", "muon", "pion"};
  return kinds;
}

const std::vector<std::string>& optimizer_config_keys(const std::string& kind) {
  auto it = key_table().find(kind);
  if (it == key_table().end()) {
    throw Error("unknown optimizer '" + kind + "'; choose one of " + join(optimizer_kinds(), "|"));
  }
  return it->second;
}

double default_lr(const std::string& kind) {
  optimizer_config_keys(kind);  // rejects an unknown kind
  if (kind == "adamw") return kAdamwLr;
  if (kind == "muon") return kMuonLr;
  return kPionLr;
}

std::unique_ptr<Optimizer> make_optimizer(const std::string& kind, const nlohmann::json& config,
                                          std::vector<Param> params) {
  optimizer_config_keys(kind);  // rejects an unknown kind
  if (kind == "adamw") return make_from_config<AdamW>(kind, kAdamwLr, config, std::move(params));
  if (kind == "muon") return make_from_config<Muon>(kind, kMuonLr, config, std::move(params));
  return make_from_config<Pion>(kind, kPionLr, config, std::move(params));
}

}  // namespace pion
