#include "pion/optim/adamw.h"

#include <cmath>

#include "pion/core/error.h"
#include "pion/optim/options_json.h"
#include "pion/optim/state_util.h"

namespace pion {

std::size_t AdamW::add_param_group(std::vector<Param> params, double lr, const Options& options) {
  validate_options(options, "adamw");
  std::size_t g = add_group(std::move(params), lr);
  options_.push_back(options);
  return g;
}

nlohmann::json AdamW::group_options(std::size_t g) const {
  return options_to_json(options_.at(g));
}

void AdamW::set_group_options(std::size_t g, const nlohmann::json& j) {
  options_.at(g) = options_from_group_json<Options>(j, "adamw");
}

std::vector<StateSlot> AdamW::state_slots(const Shape& param) const {
  return {{"exp_avg", param, false}, {"exp_avg_sq", param, true}};
}

void AdamW::update_group(std::size_t g) {
  ParamGroup& group = groups_[g];
  const Options& o = options_[g];
  const double t = static_cast<double>(steps_);
  const double bias1 = 1.0 - std::pow(o.beta1, t);
  const double bias2 = 1.0 - std::pow(o.beta2, t);
  // torch: step_size = lr / bias1; denom = sqrt(v) / sqrt(bias2) + eps; p -= step_size * m / denom
  const float step_size = static_cast<float>(group.lr / bias1);
  const float bias2_sqrt = static_cast<float>(std::sqrt(bias2));
  // W -= (lr wd) W rather than W *= float(1 - lr wd): the rounded factor would carry an
  // error of up to 3e-8 relative to |W| into every step, large next to small lr * wd.
  const float decay_rate = static_cast<float>(group.lr * o.weight_decay);
  const float b1 = static_cast<float>(o.beta1), b2 = static_cast<float>(o.beta2);
  // 1 - beta in double, then rounded: 1.0f - float(0.999) is off by 1.3e-5 relative (float
  // spacing near 1 is 6e-8), which shifted every update by ~6e-6 relative from torch's.
  const float one_minus_b1 = static_cast<float>(1.0 - o.beta1);
  const float one_minus_b2 = static_cast<float>(1.0 - o.beta2);
  const float eps = static_cast<float>(o.eps);
  for (Param& p : group.params) {
    StateMap& s = state_for(p);
    float* m = state_tensor(s, "exp_avg", p.value.shape()).data<float>();
    float* v = state_tensor(s, "exp_avg_sq", p.value.shape()).data<float>();
    float* w = p.value.data<float>();
    const float* grad = p.grad.data<float>();
    const std::int64_t n = p.value.numel();
#pragma omp parallel for schedule(static)
    for (std::int64_t i = 0; i < n; ++i) {
      w[i] -= decay_rate * w[i];
      m[i] = m[i] * b1 + one_minus_b1 * grad[i];
      v[i] = v[i] * b2 + one_minus_b2 * grad[i] * grad[i];
      const float denom = std::sqrt(v[i]) / bias2_sqrt + eps;
      w[i] -= step_size * m[i] / denom;
    }
  }
}

}  // namespace pion
