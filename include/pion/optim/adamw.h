#pragma once
// AdamW with torch.optim.AdamW semantics: decoupled weight decay W -= lr * wd * W applied
// before the step, bias-corrected moments, denominator sqrt(v_hat) + eps.
#include "pion/optim/optimizer.h"
#include "pion/optim/options.h"

namespace pion {

class AdamW : public Optimizer {
 public:
  using Options = AdamWOptions;  // its fields: pion/optim/options.h

  std::string kind() const override { return "adamw"; }
  std::size_t add_param_group(std::vector<Param> params, double lr, const Options& options);
  const Options& options(std::size_t g) const { return options_.at(g); }

  nlohmann::json group_options(std::size_t g) const override;
  void set_group_options(std::size_t g, const nlohmann::json& options) override;
  std::vector<StateSlot> state_slots(const Shape& param) const override;

 protected:
  void update_group(std::size_t g) override;

 private:
  std::vector<Options> options_;
};

}  // namespace pion
