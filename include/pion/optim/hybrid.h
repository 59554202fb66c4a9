#pragma once
// Hybrid routing, as Muon and Pion are meant to be used: hidden 2-D matrices go to the
// matrix optimizer (Muon or Pion), everything else (embeddings, LM head, norms, biases) to
// AdamW, each with its own learning rate. OptimizerSet steps several optimizers as one:
// a NaN/Inf anywhere skips the step for all of them.
#include <functional>
#include <memory>
#include <vector>

#include "pion/optim/optimizer.h"

namespace pion {

// The default rule: a 2-D parameter whose name names neither an embedding nor the LM head.
bool is_hidden_matrix(const Param& p);

struct RoutedParams {
  std::vector<Param> matrix;  // to Muon / Pion
  std::vector<Param> other;   // to AdamW
};
RoutedParams route_params(const std::vector<Param>& params,
                          const std::function<bool(const Param&)>& to_matrix = is_hidden_matrix);

class OptimizerSet {
 public:
  void add(std::unique_ptr<Optimizer> optimizer);
  // Steps every optimizer, or none (and counts a skipped step) if any gradient is non-finite.
  bool step();
  // Counts a skipped step without looking at gradients (data-parallel training decides from
  // the all-reduced gradient norm, identically on every rank, since a rank's optimizers see
  // only the parameters it owns).
  void skip_step();
  void zero_grad();
  void set_lr_factor(double factor);
  std::int64_t skipped_steps() const { return skipped_steps_; }
  // Restores the set-level count (a GPU run keeps its own and copies it here to save).
  void set_skipped_steps(std::int64_t skipped) { skipped_steps_ = skipped; }
  std::size_t state_bytes() const;
  std::size_t planned_state_bytes() const;  // see Optimizer::planned_state_bytes
  std::vector<std::unique_ptr<Optimizer>>& optimizers() { return optimizers_; }
  const std::vector<std::unique_ptr<Optimizer>>& optimizers() const { return optimizers_; }
  // Optimizer i's state is stored under the prefix "optim.<i>.".
  void save_state(TensorFile& out) const;
  void load_state(const TensorFile& in);

 private:
  std::vector<std::unique_ptr<Optimizer>> optimizers_;
  std::int64_t skipped_steps_ = 0;
};

}  // namespace pion
