#pragma once
// The optimizer interface, in the spirit of torch.optim: named parameters in param groups,
// each group with its own learning rate and hyperparameters; step(), zero_grad(), and a
// state dict (safetensors tensors + JSON metadata) that lets a resumed run continue
// bit-exactly. Concrete optimizers (adamw.h, muon.h, pion.h) implement update_group().
#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "pion/core/safetensors.h"
#include "pion/core/tensor.h"

namespace pion {

// A trainable tensor and its gradient. Both are fp32 views (usually into one big parameter
// buffer and one big gradient buffer); the optimizer updates `value` in place.
struct Param {
  std::string name;
  Tensor value;
  Tensor grad;
};

struct ParamGroup {
  std::vector<Param> params;
  double lr = 0.0;       // learning rate used by the next step (a schedule sets it)
  double base_lr = 0.0;  // the peak learning rate; schedules multiply it by a factor
};

// Named state tensors of one parameter, e.g. {"exp_avg": ..., "exp_avg_sq": ...}.
using StateMap = std::map<std::string, Tensor>;

// One state tensor an optimizer keeps per parameter: its key, its fp32 shape, and whether its
// values must be >= 0 (second moments, singular values).
struct StateSlot {
  std::string key;
  Shape shape;
  bool non_negative = false;
};

class Optimizer {
 public:
  virtual ~Optimizer() = default;
  Optimizer() = default;
  Optimizer(const Optimizer&) = delete;
  Optimizer& operator=(const Optimizer&) = delete;

  // "adamw", "muon", "pion": written into state dicts and checked on load.
  virtual std::string kind() const = 0;

  // Applies one update to every group. When any gradient holds NaN or Inf the step is
  // skipped: weights and state are untouched, skipped_steps() grows, and it returns false.
  bool step();
  // Applies one update without the finite check (OptimizerSet checks all optimizers first).
  void step_unchecked();
  void zero_grad();
  bool grads_finite() const;
  void record_skipped_step() { ++skipped_steps_; }

  std::vector<ParamGroup>& groups() { return groups_; }
  const std::vector<ParamGroup>& groups() const { return groups_; }
  // Sets every group's lr to base_lr * factor (what a schedule does each step).
  void set_lr_factor(double factor);
  std::int64_t steps() const { return steps_; }
  std::int64_t skipped_steps() const { return skipped_steps_; }

  // State of one parameter, or nullptr before its first step.
  const StateMap* state(const std::string& param_name) const;
  // Replaces the state of one parameter and the step counters, e.g. with a copy of what a GPU
  // optimizer holds, so this optimizer's state dict (save_state) describes that run. The
  // state is validated (check_state: every tensor present, right shapes) before anything
  // changes; an unknown parameter name throws pion::Error.
  void set_state(const std::string& param_name, StateMap state);
  void set_counters(std::int64_t steps, std::int64_t skipped_steps);
  // The state tensors this optimizer keeps for a parameter of shape `param`: the one place
  // each optimizer states their shapes (check_state and the GPU trainer use it).
  virtual std::vector<StateSlot> state_slots(const Shape& param) const = 0;
  // The state tensors kept for parameter `p` of this optimizer: state_slots(p's shape), unless
  // the slots also depend on p's param group (Pion's variants keep different tensors).
  virtual std::vector<StateSlot> param_state_slots(const Param& p) const {
    return state_slots(p.value.shape());
  }
  // The shape of state tensor `key` for a parameter of shape `param` (throws pion::Error for
  // a key this optimizer does not keep).
  Shape state_shape(const std::string& key, const Shape& param) const;
  // Bytes of optimizer state (all StateMaps).
  std::size_t state_bytes() const;
  // Bytes the state will take once every parameter has stepped (state is created lazily, so
  // state_bytes() is 0 before the first step): param_state_slots of every parameter, fp32.
  std::size_t planned_state_bytes() const;

  // State dict. Tensors are stored as "<prefix><param name>.<state key>"; one metadata entry
  // "<prefix>meta" holds a JSON object with kind, step counters and each group's
  // hyperparameters and parameter names. load_state checks that the parameters and shapes
  // match this optimizer's and restores hyperparameters, counters and state exactly.
  void save_state(TensorFile& out, const std::string& prefix = "optim.") const;
  void load_state(const TensorFile& in, const std::string& prefix = "optim.");

  // Hyperparameters of group g other than lr (e.g. betas), as JSON; and the inverse.
  virtual nlohmann::json group_options(std::size_t g) const = 0;
  virtual void set_group_options(std::size_t g, const nlohmann::json& options) = 0;

 protected:
  // One update of group g. steps() has already been incremented (it is 1 on the first step).
  virtual void update_group(std::size_t g) = 0;
  // Called by load_state (after the saved hyperparameters are in place, since they can decide
  // which tensors a parameter keeps) and set_state for every parameter that has state, before
  // any state is replaced: throws pion::Error when a tensor of state_slots is missing, has the wrong
  // shape or holds a non-finite (or, where non_negative, a negative) value.
  void check_state(const Param& p, const StateMap& state) const;
  // The state of p, created empty on first use.
  StateMap& state_for(const Param& p) { return state_[p.name]; }
  // Checks a new group's params (defined, fp32, value/grad shapes equal, unique names) and adds it.
  std::size_t add_group(std::vector<Param> params, double lr);

  std::vector<ParamGroup> groups_;
  std::map<std::string, StateMap> state_;
  std::int64_t steps_ = 0;
  std::int64_t skipped_steps_ = 0;
};

}  // namespace pion
