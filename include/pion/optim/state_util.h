#pragma once
// Small helpers every optimizer uses to create and check its per-parameter state tensors.
#include <cmath>
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

// What loaded state values must satisfy besides being finite.
enum class StateSign { Any, NonNegative };

// Throws a clear error when loaded state lacks `key`, has another shape, or holds a value that
// is not finite (or negative, for second moments and singular values): such state would turn
// the weights NaN on the first step after a resume.
inline void require_state(const Param& p, const StateMap& state, const std::string& key,
                          const Shape& shape, StateSign sign = StateSign::Any) {
  auto it = state.find(key);
  check(it != state.end(), "optimizer state for '" + p.name + "' lacks '" + key + "'");
  const Tensor& t = it->second;
  check(t.shape() == shape, "optimizer state '" + p.name + "." + key + "' has shape " +
                                shape_string(t.shape()) + ", expected " + shape_string(shape));
  check(t.dtype() == DType::F32, "optimizer state '" + p.name + "." + key + "' must be F32");
  const float* v = t.data<float>();
  for (std::int64_t i = 0; i < t.numel(); ++i)
    check(std::isfinite(v[i]) && (sign == StateSign::Any || v[i] >= 0.0f),
          "optimizer state '" + p.name + "." + key + "' holds " +
              (std::isfinite(v[i]) ? "a negative" : "a non-finite") + " value at element " +
              std::to_string(i) + "; the checkpoint is damaged");
}

}  // namespace pion
