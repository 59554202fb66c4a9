#include "pion/optim/optimizer.h"

#include <cmath>
#include <cstring>
#include <set>

#include "pion/core/error.h"
#include "pion/core/input.h"
#include "pion/optim/state_util.h"

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

Shape Optimizer::state_shape(const std::string& key, const Shape& param) const {
  for (const StateSlot& s : state_slots(param))
    if (s.key == key) return s.shape;
  throw Error(kind() + ": no optimizer state named '" + key + "'");
}

void Optimizer::check_state(const Param& p, const StateMap& state) const {
  for (const StateSlot& s : param_state_slots(p))
    require_state(p, state, s.key, s.shape, s.non_negative ? StateSign::NonNegative : StateSign::Any);
}

void Optimizer::set_state(const std::string& param_name, StateMap state) {
  const Param* owner = nullptr;
  for (const auto& g : groups_)
    for (const auto& p : g.params)
      if (p.name == param_name) owner = &p;
  check(owner != nullptr, kind() + ": set_state for unknown parameter '" + param_name + "'");
  for (const auto& [key, t] : state)
    check(t.dtype() == DType::F32, kind() + ": state '" + key + "' of '" + param_name + "' must be F32");
  check_state(*owner, state);
  state_[param_name] = std::move(state);
}

void Optimizer::set_counters(std::int64_t steps, std::int64_t skipped_steps) {
  check(steps >= 0 && skipped_steps >= 0, kind() + ": step counters must be >= 0");
  steps_ = steps;
  skipped_steps_ = skipped_steps;
}

std::size_t Optimizer::planned_state_bytes() const {
  std::size_t bytes = 0;
  for (const auto& g : groups_)
    for (const auto& p : g.params)
      for (const auto& slot : param_state_slots(p))
        bytes += static_cast<std::size_t>(shape_numel(slot.shape)) * sizeof(float);
  return bytes;
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
  // Which parameters have state, so a load can tell a dropped tensor set from a parameter
  // that never stepped (e.g. one added after training started).
  meta["stateful"] = nlohmann::json::array();
  for (const auto& [name, s] : state_) {
    meta["stateful"].push_back(name);
    for (const auto& [key, t] : s) out.tensors[prefix + name + "." + key] = t;
  }
  out.metadata[prefix + "meta"] = meta.dump();
}

void Optimizer::load_state(const TensorFile& in, const std::string& prefix) {
  auto it = in.metadata.find(prefix + "meta");
  check(it != in.metadata.end(), "optimizer state: metadata '" + prefix + "meta' is missing");
  // Read and validate everything first, so a mismatch leaves this optimizer untouched.
  struct GroupMeta {
    nlohmann::json options;
    double lr, base_lr;
  };
  std::vector<GroupMeta> group_meta;
  std::vector<std::string> stateful;
  std::int64_t steps = 0, skipped_steps = 0;
  try {
    const nlohmann::json meta = input::parse_json(it->second, "optimizer state metadata '" + prefix + "meta'");
    check(meta.is_object(), "optimizer state: metadata '" + prefix + "meta' must be a JSON object");
    const std::string saved_kind =
        input::to_string(input::member(meta, "kind", prefix + "meta"), 32, prefix + "meta kind");
    check(saved_kind == kind(), "optimizer state was saved by " + input::describe(saved_kind) +
                                    ", not '" + kind() + "'");
    check(meta.contains("groups") && meta.at("groups").size() == groups_.size(),
          "optimizer state: number of param groups differs from this optimizer's");
    for (std::size_t g = 0; g < groups_.size(); ++g) {
      const auto& jg = meta.at("groups").at(g);
      const auto& names = jg.at("params");
      check(names.size() == groups_[g].params.size(),
            "optimizer state: group " + std::to_string(g) + " has a different number of parameters");
      for (std::size_t i = 0; i < names.size(); ++i)
        check(names[i].is_string() && names[i].get<std::string>() == groups_[g].params[i].name,
              "optimizer state: group " + std::to_string(g) + " parameter " + std::to_string(i) +
                  " is " + input::describe(names[i]) + ", expected '" +
                  groups_[g].params[i].name + "'");
      const std::string gw = prefix + "meta group " + std::to_string(g);
      GroupMeta gm{jg.at("options"), input::to_double(jg.at("lr"), 0.0, 1e6, gw + " lr"),
                   input::to_double(jg.at("base_lr"), 0.0, 1e6, gw + " base_lr")};
      group_meta.push_back(std::move(gm));
    }
    // A step count outside [0, 2^53] would turn the bias corrections negative or NaN.
    constexpr std::int64_t kMaxSteps = std::int64_t{1} << 53;
    if (meta.contains("steps")) steps = input::to_int(meta["steps"], 0, kMaxSteps, prefix + "meta steps");
    if (meta.contains("skipped_steps"))
      skipped_steps = input::to_int(meta["skipped_steps"], 0, kMaxSteps, prefix + "meta skipped_steps");
    if (meta.contains("stateful")) stateful = meta.at("stateful").get<std::vector<std::string>>();
  } catch (const nlohmann::json::exception& e) {
    throw Error("optimizer state: metadata '" + prefix + "meta' is malformed (" + e.what() + ")");
  }
  std::map<std::string, StateMap> new_state;
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
  for (const auto& name : stateful)
    check(new_state.count(name) == 1,
          "optimizer state: the tensors of parameter '" + name + "' are missing from the file");
  // Hyperparameters go through the subclass, which may still reject them; they come before
  // the state check because they can decide which tensors a parameter keeps (Pion's
  // variants). Restore the old ones if either fails, so a failed load changes nothing.
  std::vector<nlohmann::json> old_options;
  for (std::size_t g = 0; g < groups_.size(); ++g) old_options.push_back(group_options(g));
  const auto restore_options = [&] {
    for (std::size_t g = 0; g < groups_.size(); ++g) set_group_options(g, old_options[g]);
  };
  try {
    for (std::size_t g = 0; g < groups_.size(); ++g) set_group_options(g, group_meta[g].options);
  } catch (const std::exception& e) {
    restore_options();
    throw Error("optimizer state: bad hyperparameters in '" + prefix + "meta' (" + e.what() + ")");
  }
  try {
    for (const auto& [name, s] : new_state) check_state(*by_name.at(name), s);
  } catch (...) {
    restore_options();
    throw;
  }
  for (std::size_t g = 0; g < groups_.size(); ++g) {
    groups_[g].lr = group_meta[g].lr;
    groups_[g].base_lr = group_meta[g].base_lr;
  }
  state_ = std::move(new_state);
  steps_ = steps;
  skipped_steps_ = skipped_steps;
}

}  // namespace pion
