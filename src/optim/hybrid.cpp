#include "pion/optim/hybrid.h"

#include "pion/core/error.h"

namespace pion {

bool is_hidden_matrix(const Param& p) {
  if (p.value.ndim() != 2) return false;
  const std::string& n = p.name;
  return n.find("embed") == std::string::npos && n.find("lm_head") == std::string::npos;
}

RoutedParams route_params(const std::vector<Param>& params,
                          const std::function<bool(const Param&)>& to_matrix) {
  RoutedParams out;
  for (const auto& p : params) (to_matrix(p) ? out.matrix : out.other).push_back(p);
  return out;
}

void OptimizerSet::add(std::unique_ptr<Optimizer> optimizer) {
  check(optimizer != nullptr, "OptimizerSet::add: null optimizer");
  optimizers_.push_back(std::move(optimizer));
}

bool OptimizerSet::step() {
  for (const auto& o : optimizers_) {
    if (!o->grads_finite()) {
      skip_step();
      return false;
    }
  }
  for (auto& o : optimizers_) o->step_unchecked();
  return true;
}

void OptimizerSet::skip_step() {
  for (auto& each : optimizers_) each->record_skipped_step();
  ++skipped_steps_;
}

void OptimizerSet::zero_grad() {
  for (auto& o : optimizers_) o->zero_grad();
}

void OptimizerSet::set_lr_factor(double factor) {
  for (auto& o : optimizers_) o->set_lr_factor(factor);
}

std::size_t OptimizerSet::planned_state_bytes() const {
  std::size_t b = 0;
  for (const auto& o : optimizers_) b += o->planned_state_bytes();
  return b;
}

std::size_t OptimizerSet::state_bytes() const {
  std::size_t b = 0;
  for (const auto& o : optimizers_) b += o->state_bytes();
  return b;
}

void OptimizerSet::save_state(TensorFile& out) const {
  for (std::size_t i = 0; i < optimizers_.size(); ++i)
    optimizers_[i]->save_state(out, "optim." + std::to_string(i) + ".");
  out.metadata["optim.skipped_steps"] = std::to_string(skipped_steps_);
}

void OptimizerSet::load_state(const TensorFile& in) {
  std::int64_t skipped = 0;
  if (auto it = in.metadata.find("optim.skipped_steps"); it != in.metadata.end()) {
    try {
      skipped = std::stoll(it->second);
    } catch (const std::exception&) {
      throw Error("optimizer state: 'optim.skipped_steps' is not an integer: '" + it->second + "'");
    }
  }
  // Optimizers load one by one; if a later one rejects the file, put the earlier ones back
  // from an in-memory copy so a failed load changes nothing.
  TensorFile backup;
  for (std::size_t i = 0; i < optimizers_.size(); ++i)
    optimizers_[i]->save_state(backup, "optim." + std::to_string(i) + ".");
  std::size_t loaded = 0;
  try {
    for (; loaded < optimizers_.size(); ++loaded)
      optimizers_[loaded]->load_state(in, "optim." + std::to_string(loaded) + ".");
  } catch (...) {
    for (std::size_t i = 0; i < loaded; ++i)
      optimizers_[i]->load_state(backup, "optim." + std::to_string(i) + ".");
    throw;
  }
  skipped_steps_ = skipped;
}

}  // namespace pion
