#include "pion/optim/factory.h"

#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <map>

#include "pion/core/error.h"
#include "pion/core/input.h"
#include "pion/optim/adamw.h"
#include "pion/optim/muon.h"
#include "pion/optim/pion.h"

namespace pion {

namespace {

using nlohmann::json;

// Defaults for "lr", the one hyperparameter the optimizers' Options do not hold: torch's AdamW
// default, the Muon reference's default, and Pion's fp64 reference default (tests/reference).
constexpr double kAdamwLr = 1e-3;
constexpr double kMuonLr = 0.02;
constexpr double kPionLr = 0.01;

const std::map<std::string, std::vector<std::string>>& key_table() {
  static const std::map<std::string, std::vector<std::string>> table = {
      {"adamw", {"lr", "beta1", "beta2", "eps", "weight_decay"}},
      {"muon", {"lr", "momentum", "nesterov", "ns_steps", "weight_decay", "eps"}},
      {"pion", {"lr", "c", "beta1", "beta2", "eps", "retraction", "reanchor_every"}},
  };
  return table;
}

std::string join(const std::vector<std::string>& items, const std::string& sep) {
  std::string out;
  for (const std::string& s : items) out += (out.empty() ? "" : sep) + s;
  return out;
}

// Reads one kind's keys out of a config object. Construction rejects a non-object and unknown
// keys; each read_* call checks the JSON type and the value and leaves `out` untouched (the
// optimizer's default) when the key is absent.
class ConfigReader {
 public:
  ConfigReader(const std::string& kind, const json& config)
      : kind_(kind), keys_(optimizer_config_keys(kind)), config_(config) {
    if (!config_.is_object()) {
      throw Error(kind_ + " config must be a JSON object such as {\"lr\": 0.01}, got " +
                  input::describe(config_) + valid_keys());
    }
    for (const auto& [key, value] : config_.items()) {
      bool known = false;
      for (const std::string& k : keys_) known = known || k == key;
      if (!known) throw Error(kind_ + " config: unknown key " + input::describe(key) + valid_keys());
    }
  }

  // A finite number (JSON integer or float, not a bool) for which `valid` holds; `rule` says
  // what valid means, for the message.
  void read_number(const std::string& key, double& out, const std::function<bool(double)>& valid,
                   const std::string& rule) const {
    const json* v = find(key);
    if (!v) return;
    if (!v->is_number()) fail(key, "must be a number " + rule, *v);
    const double x = v->get<double>();
    if (!std::isfinite(x) || !valid(x)) fail(key, "must be a number " + rule, *v);
    out = x;
  }

  template <class Int>
  void read_int(const std::string& key, Int& out, std::int64_t lo, std::int64_t hi) const {
    const json* v = find(key);
    if (!v) return;
    const std::string rule =
        "must be an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]";
    if (!v->is_number_integer()) fail(key, rule, *v);
    const auto x = v->get<std::int64_t>();
    if (x < lo || x > hi) fail(key, rule, *v);
    out = static_cast<Int>(x);
  }

  void read_bool(const std::string& key, bool& out) const {
    const json* v = find(key);
    if (!v) return;
    if (!v->is_boolean()) fail(key, "must be true or false", *v);
    out = v->get<bool>();
  }

  // One of `choices` (a JSON string); returns the index of the choice, or -1 when absent.
  int read_choice(const std::string& key, const std::vector<std::string>& choices) const {
    const json* v = find(key);
    if (!v) return -1;
    const std::string rule = "must be one of \"" + join(choices, "\", \"") + "\"";
    if (!v->is_string()) fail(key, rule, *v);
    for (std::size_t i = 0; i < choices.size(); ++i)
      if (choices[i] == v->get<std::string>()) return static_cast<int>(i);
    fail(key, rule, *v);
  }

  // Re-throws an optimizer's own argument check with the list of valid keys, so every config
  // error reads the same way.
  [[noreturn]] void rethrow(const Error& e) const {
    throw Error(kind_ + " config: " + e.what() + valid_keys());
  }

 private:
  const json* find(const std::string& key) const {
    auto it = config_.find(key);
    return it == config_.end() ? nullptr : &*it;
  }
  [[noreturn]] void fail(const std::string& key, const std::string& rule, const json& v) const {
    throw Error(kind_ + " config: key '" + key + "' " + rule + ", got " + input::describe(v) + valid_keys());
  }
  std::string valid_keys() const {
    return " (valid keys for " + kind_ + ": " + join(keys_, ", ") + ")";
  }

  std::string kind_;
  const std::vector<std::string>& keys_;
  const json& config_;
};

const auto kNonNegative = [](double x) { return x >= 0; };
const auto kPositive = [](double x) { return x > 0; };
const auto kUnitInterval = [](double x) { return x >= 0 && x < 1; };

std::unique_ptr<Optimizer> make_adamw(const json& config, std::vector<Param> params) {
  ConfigReader r("adamw", config);
  double lr = kAdamwLr;
  AdamW::Options o;
  r.read_number("lr", lr, kNonNegative, ">= 0");
  r.read_number("beta1", o.beta1, kUnitInterval, "in [0, 1)");
  r.read_number("beta2", o.beta2, kUnitInterval, "in [0, 1)");
  r.read_number("eps", o.eps, kNonNegative, ">= 0");
  r.read_number("weight_decay", o.weight_decay, kNonNegative, ">= 0");
  auto opt = std::make_unique<AdamW>();
  try {
    opt->add_param_group(std::move(params), lr, o);
  } catch (const Error& e) {
    r.rethrow(e);
  }
  return opt;
}

std::unique_ptr<Optimizer> make_muon(const json& config, std::vector<Param> params) {
  ConfigReader r("muon", config);
  double lr = kMuonLr;
  Muon::Options o;
  r.read_number("lr", lr, kNonNegative, ">= 0");
  r.read_number("momentum", o.momentum, kUnitInterval, "in [0, 1)");
  r.read_bool("nesterov", o.nesterov);
  r.read_int("ns_steps", o.ns_steps, 1, 100);
  r.read_number("weight_decay", o.weight_decay, kNonNegative, ">= 0");
  r.read_number("eps", o.eps, kPositive, "> 0");
  auto opt = std::make_unique<Muon>();
  try {
    opt->add_param_group(std::move(params), lr, o);
  } catch (const Error& e) {
    r.rethrow(e);
  }
  return opt;
}

std::unique_ptr<Optimizer> make_pion(const json& config, std::vector<Param> params) {
  ConfigReader r("pion", config);
  double lr = kPionLr;
  Pion::Options o;
  r.read_number("lr", lr, kNonNegative, ">= 0");
  r.read_number("c", o.c, kPositive, "> 0");
  r.read_number("beta1", o.beta1, kUnitInterval, "in [0, 1)");
  r.read_number("beta2", o.beta2, kUnitInterval, "in [0, 1)");
  r.read_number("eps", o.eps, kPositive, "> 0");
  const std::vector<PionRetraction> retractions = {PionRetraction::Taylor2, PionRetraction::Cayley,
                                                   PionRetraction::Exp};
  std::vector<std::string> names;
  for (PionRetraction k : retractions) names.emplace_back(retraction_name(k));
  const int choice = r.read_choice("retraction", names);
  if (choice >= 0) o.retraction = retractions[static_cast<std::size_t>(choice)];
  r.read_int("reanchor_every", o.reanchor_every, 0, std::numeric_limits<std::int32_t>::max());
  auto opt = std::make_unique<Pion>();
  try {
    opt->add_param_group(std::move(params), lr, o);
  } catch (const Error& e) {
    r.rethrow(e);
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
  if (kind == "adamw") return make_adamw(config, std::move(params));
  if (kind == "muon") return make_muon(config, std::move(params));
  return make_pion(config, std::move(params));
}

}  // namespace pion
