#pragma once
// Small helpers every optimizer uses to create and check its per-parameter state tensors.
#include <string>

#include "pion/core/error.h"
#include "pion/optim/optimizer.h"

namespace pion {

// The state tensor `key`, created zero-filled with `shape` on first use.
inline Tensor& state_tensor(StateMap& state, const std::string& key, const Shape& shape) {
  auto it = state.find(key);
  if (it == state.end()) it = state.emplace(key, Tensor::zeros(shape)).first;
  return it->second;
}

// Throws a clear error when loaded state lacks `key` or has another shape.
inline void require_state(const Param& p, const StateMap& state, const std::string& key,
                          const Shape& shape) {
  auto it = state.find(key);
  check(it != state.end(), "optimizer state for '" + p.name + "' lacks '" + key + "'");
  check(it->second.shape() == shape, "optimizer state '" + p.name + "." + key + "' has shape " +
                                         shape_string(it->second.shape()) + ", expected " +
                                         shape_string(shape));
}

}  // namespace pion
