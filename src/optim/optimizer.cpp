#include "pion/optim/optimizer.h"

#include <cmath>
#include <cstring>
#include <set>

#include "pion/core/error.h"

namespace pion {

std::size_t Optimizer::add_group(std::vector<Param> params, double lr) {
  check(std::isfinite(lr) && lr >= 0.0, kind() + ": learning rate must be finite and >= 0");
  std::set<std::string> seen;
  for (const auto& g : groups_)
    for (const auto& p : g.params) seen.insert(p.name);
  for (const auto& p : params) {
    check(p.value.defined() && p.grad.defined(), kind() + ": parameter '" + p.name + "' has no value or grad");
    check(p.value.dtype() == DType::F32 && p.grad.dtype() == DType::F32,
          kind() + ": parameter '" + p.name + "' must be fp32");
    check(p.value.shape() == p.grad.shape(),
          kind() + ": parameter '" + p.name + "' has value " + shape_string(p.value.shape()) +
              " but grad " + shape_string(p.grad.shape()));
    check(seen.insert(p.name).second, kind() + ": parameter '" + p.name + "' appears twice");
  }
  groups_.push_back(ParamGroup{std::move(params), lr, lr});
  return groups_.size() - 1;
}

bool Optimizer::grads_finite() const {
  for (const auto& g : groups_) {
    for (const auto& p : g.params) {
      const float* d = p.grad.data<float>();
      const std::int64_t n = p.grad.numel();
      int bad = 0;
#pragma omp parallel for reduction(| : bad) schedule(static)
      for (std::int64_t i = 0; i < n; ++i) bad |= !std::isfinite(d[i]);
      if (bad) return false;
    }
  }
  return true;
}

bool Optimizer::step() {
  if (!grads_finite()) {
    record_skipped_step();
    return false;
  }
  step_unchecked();
  return true;
}

void Optimizer::step_unchecked() {
  ++steps_;
  for (std::size_t g = 0; g < groups_.size(); ++g) update_group(g);
}

void Optimizer::zero_grad() {
  for (auto& g : groups_)
    for (auto& p : g.params) std::memset(p.grad.raw(), 0, p.grad.nbytes());
}

void Optimizer::set_lr_factor(double factor) {
  for (auto& g : groups_) g.lr = g.base_lr * factor;
}

const StateMap* Optimizer::state(const std::string& param_name) const {
  auto it = state_.find(param_name);
  return it == state_.end() ? nullptr : &it->second;
}

std::size_t Optimizer::state_bytes() const {
  std::size_t bytes = 0;
  for (const auto& [name, s] : state_)
    for (const auto& [key, t] : s) bytes += t.nbytes();
  return bytes;
}

void Optimizer::save_state(TensorFile& out, const std::string& prefix) const {
  nlohmann::json meta;
  meta["kind"] = kind();
  meta["steps"] = steps_;
  meta["skipped_steps"] = skipped_steps_;
  meta["groups"] = nlohmann::json::array();
  for (std::size_t g = 0; g < groups_.size(); ++g) {
    nlohmann::json jg;
    jg["lr"] = groups_[g].lr;
    jg["base_lr"] = groups_[g].base_lr;
    jg["options"] = group_options(g);
    jg["params"] = nlohmann::json::array();
    for (const auto& p : groups_[g].params) jg["params"].push_back(p.name);
    meta["groups"].push_back(jg);
  }
  for (const auto& [name, s] : state_)
    for (const auto& [key, t] : s) out.tensors[prefix + name + "." + key] = t;
  out.metadata[prefix + "meta"] = meta.dump();
}

void Optimizer::load_state(const TensorFile& in, const std::string& prefix) {
  auto it = in.metadata.find(prefix + "meta");
  check(it != in.metadata.end(), "optimizer state: metadata '" + prefix + "meta' is missing");
  nlohmann::json meta;
  try {
    meta = nlohmann::json::parse(it->second);
  } catch (const nlohmann::json::exception& e) {
    throw Error("optimizer state: metadata '" + prefix + "meta' is not valid JSON");
  }
  check(meta.value("kind", "") == kind(), "optimizer state was saved by '" +
                                              meta.value("kind", "?") + "', not '" + kind() + "'");
  check(meta.contains("groups") && meta["groups"].size() == groups_.size(),
        "optimizer state: number of param groups differs from this optimizer's");
  // Validate everything first so a mismatch leaves this optimizer untouched.
  std::map<std::string, StateMap> new_state;
  for (std::size_t g = 0; g < groups_.size(); ++g) {
    const auto& names = meta["groups"][g]["params"];
    check(names.size() == groups_[g].params.size(),
          "optimizer state: group " + std::to_string(g) + " has a different number of parameters");
    for (std::size_t i = 0; i < names.size(); ++i)
      check(names[i] == groups_[g].params[i].name,
            "optimizer state: group " + std::to_string(g) + " parameter " + std::to_string(i) +
                " is '" + names[i].get<std::string>() + "', expected '" +
                groups_[g].params[i].name + "'");
  }
  std::map<std::string, const Param*> by_name;
  for (const auto& g : groups_)
    for (const auto& p : g.params) by_name[p.name] = &p;
  for (const auto& [key, t] : in.tensors) {
    if (key.rfind(prefix, 0) != 0) continue;
    const std::string rest = key.substr(prefix.size());
    // The longest parameter name that prefixes `rest` followed by '.' owns the tensor.
    const Param* owner = nullptr;
    for (const auto& [name, p] : by_name)
      if (rest.size() > name.size() && rest.compare(0, name.size(), name) == 0 &&
          rest[name.size()] == '.' && (!owner || name.size() > owner->name.size()))
        owner = p;
    check(owner != nullptr, "optimizer state: tensor '" + key + "' belongs to no parameter");
    check(t.dtype() == DType::F32, "optimizer state: tensor '" + key + "' must be F32");
    new_state[owner->name][rest.substr(owner->name.size() + 1)] = t.clone();
  }
  for (const auto& [name, s] : new_state) check_state(*by_name.at(name), s);
  for (std::size_t g = 0; g < groups_.size(); ++g) {
    const auto& jg = meta["groups"][g];
    set_group_options(g, jg.at("options"));
    groups_[g].lr = jg.at("lr").get<double>();
    groups_[g].base_lr = jg.at("base_lr").get<double>();
  }
  state_ = std::move(new_state);
  steps_ = meta.value("steps", std::int64_t{0});
  skipped_steps_ = meta.value("skipped_steps", std::int64_t{0});
}

}  // namespace pion
