#pragma once
// AdamW with torch.optim.AdamW semantics: decoupled weight decay W -= lr * wd * W applied
// before the step, bias-corrected moments, denominator sqrt(v_hat) + eps.
#include "pion/optim/optimizer.h"

namespace pion {

class AdamW : public Optimizer {
 public:
  struct Options {
    double beta1 = 0.9;
    double beta2 = 0.999;
    double eps = 1e-8;
    double weight_decay = 0.01;
  };

  std::string kind() const override { return "adamw"; }
  std::size_t add_param_group(std::vector<Param> params, double lr, const Options& options);
  const Options& options(std::size_t g) const { return options_.at(g); }

  nlohmann::json group_options(std::size_t g) const override;
  void set_group_options(std::size_t g, const nlohmann::json& options) override;

 protected:
  void update_group(std::size_t g) override;
  void check_state(const Param& p, const StateMap& state) const override;

 private:
  std::vector<Options> options_;
};

}  // namespace pion
