#pragma once
// Host-side helpers shared by the GPU optimizers: parameter and option checks, shape
// grouping, state copies, and the base class that owns queue_step() and the device-side
// step scalars.
#include <cmath>
#include <limits>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "../context.cuh"
#include "batched.cuh"
#include "pion/cuda/optim.h"

namespace pion::cuda::detail {

inline void validate_params(const std::vector<DeviceParam>& params, const std::string& who) {
  check(!params.empty(), who + ": no parameters");
  std::set<std::string> names;
  // cuBLAS takes int dimensions and leading dimensions.
  constexpr std::int64_t kMaxDim = std::numeric_limits<int>::max();
  for (const DeviceParam& p : params) {
    check(p.value != nullptr && p.grad != nullptr,
          who + ": parameter '" + p.name + "' has a null value or grad pointer");
    check(p.rows > 0 && p.cols > 0 && p.rows <= kMaxDim && p.cols <= kMaxDim,
          who + ": parameter '" + p.name + "' has shape " + std::to_string(p.rows) + "x" +
              std::to_string(p.cols) + "; need 0 < rows, cols < 2^31");
    check(names.insert(p.name).second, who + ": parameter name '" + p.name + "' appears twice");
  }
}

// Indices of params grouped by key(param), in first-seen order inside each group.
template <class Key, class KeyOf>
std::map<Key, std::vector<std::size_t>> group_params(const std::vector<DeviceParam>& params,
                                                     KeyOf key_of) {
  std::map<Key, std::vector<std::size_t>> out;
  for (std::size_t i = 0; i < params.size(); ++i) out[key_of(params[i])].push_back(i);
  return out;
}

inline std::map<std::pair<std::int64_t, std::int64_t>, std::vector<std::size_t>> group_by_shape(
    const std::vector<DeviceParam>& params) {
  return group_params<std::pair<std::int64_t, std::int64_t>>(
      params, [](const DeviceParam& p) { return std::make_pair(p.rows, p.cols); });
}

// The value and grad pointers of params[indices[...]], in that order.
inline std::pair<DevicePointers, DevicePointers> value_and_grad_pointers(
    const std::vector<DeviceParam>& params, const std::vector<std::size_t>& indices) {
  std::vector<float*> value, grad;
  for (std::size_t i : indices) {
    value.push_back(params[i].value);
    grad.push_back(const_cast<float*>(params[i].grad));  // only ever read
  }
  return {DevicePointers(value), DevicePointers(grad)};
}

// Synchronous copy of count floats from a device slice, after the context's stream has
// drained (the stream is non-blocking, so cudaMemcpy alone would not wait for it).
inline std::vector<float> download_slice(Context& ctx, const float* device, std::size_t count) {
  PION_CUDA_CHECK(cudaStreamSynchronize(ctx.impl().stream));
  std::vector<float> host(count);
  PION_CUDA_CHECK(cudaMemcpy(host.data(), device, count * sizeof(float), cudaMemcpyDeviceToHost));
  return host;
}

inline void upload_slice(Context& ctx, float* device, const HostState& state,
                         const std::string& key, std::size_t count, const std::string& who) {
  auto it = state.find(key);
  check(it != state.end(), who + ": state has no '" + key + "'");
  check(it->second.size() == count, who + ": state '" + key + "' has " +
                                        std::to_string(it->second.size()) + " values, expected " +
                                        std::to_string(count));
  PION_CUDA_CHECK(cudaStreamSynchronize(ctx.impl().stream));
  PION_CUDA_CHECK(
      cudaMemcpy(device, it->second.data(), count * sizeof(float), cudaMemcpyHostToDevice));
}

// Zero-filled device state (synchronous; set-up only).
inline DeviceArray<float> zeroed(std::size_t count) {
  DeviceArray<float> a(count);
  if (count > 0) PION_CUDA_CHECK(cudaMemset(a.data(), 0, count * sizeof(float)));
  PION_CUDA_CHECK(cudaDeviceSynchronize());
  return a;
}

// The base of every GPU optimizer, shaped like the CPU's Optimizer (pion/optim/optimizer.h):
// it owns the device-side StepScalars (learning rate, gradient scale, counters, the
// non-finite-gradient flag), the parameters' gradients for the finite check, the map from
// parameter names to where their state lives, and queue_step() itself:
//   bad_grad <- 0; bad_grad <- 1 when any gradient holds a NaN or Inf (unless the caller
//   turned the check off); steps += 1 (or skipped += 1 when bad_grad); then the
//   optimizer's queue_update(), which reads each gradient times grad_scale
// as Optimizer::step() checks the gradients, counts the step and calls update_group().
// A derived class calls set_params() where it checks its parameters and place() for each
// parameter's state slot, and implements queue_update().
class CudaOptimizerBase : public CudaOptimizer {
 public:
  explicit CudaOptimizerBase(Context& ctx) : ctx_(ctx), scalars_(1) {
    const StepScalars zero{0.0, 0, 0, 0, 1.0f};
    PION_CUDA_CHECK(cudaMemcpy(scalars_.data(), &zero, sizeof(zero), cudaMemcpyHostToDevice));
  }

  void queue_step() final {
    check(!gradients_.empty(), who() + ": internal error: set_params was not called");
    queue_begin_step(stream(), scalars());
    if (finite_check_)
      for (const GradientBatch& g : gradients_)
        queue_flag_non_finite(stream(), g.ptrs, g.count, g.batch, scalars());
    queue_count_step(stream(), scalars());
    queue_update();
  }

  void set_lr(double lr) override {
    if (!(std::isfinite(lr) && lr >= 0.0))
      throw Error(who() + ": learning rate must be finite and >= 0, got " + std::to_string(lr));
    queue_set_lr(stream(), scalars(), lr);
  }

  void set_grad_scale(float scale) override {
    if (!(scale >= 0.0f && scale <= 1.0f))
      throw Error(who() + ": gradient scale must be in [0, 1], got " + std::to_string(scale));
    queue_set_grad_scale(stream(), scalars(), scale);
  }

  void set_finite_check(bool on) override { finite_check_ = on; }

  std::int64_t steps() const override { return read_scalars().steps; }
  std::int64_t skipped_steps() const override { return read_scalars().skipped; }

  void set_steps(std::int64_t steps, std::int64_t skipped) override {
    check(steps >= 0 && skipped >= 0, who() + ": step counters must be >= 0");
    StepScalars s = read_scalars();
    s.steps = steps;
    s.skipped = skipped;
    PION_CUDA_CHECK(cudaMemcpy(scalars_.data(), &s, sizeof(s), cudaMemcpyHostToDevice));
  }

 protected:
  // One update of every parameter, queued after the finite check and the counters. Its
  // kernels read scalars()->bad_grad and leave W and state alone when it is set;
  // scalars()->steps already counts this step (1 on the first), as steps() does in the
  // CPU's update_group.
  virtual void queue_update() = 0;

  // "adamw (cuda)": how error messages name the optimizer.
  std::string who() const { return kind() + " (cuda)"; }

  // Checks the parameters (validate_params) and keeps their gradients, one pointer array
  // per shape, for the finite check of every step.
  void set_params(const std::vector<DeviceParam>& params) {
    validate_params(params, who());
    for (const auto& [shape, indices] : group_by_shape(params)) {
      std::vector<float*> grads;
      for (std::size_t i : indices) grads.push_back(const_cast<float*>(params[i].grad));  // read
      gradients_.push_back({DevicePointers(grads), shape.first * shape.second, indices.size()});
    }
  }

  // Parameter `name`'s state is slot `slot` of the derived class's group `group`.
  void place(const std::string& name, std::size_t group, std::size_t slot) {
    where_[name] = {group, slot};
  }
  std::pair<std::size_t, std::size_t> locate(const std::string& name) const {
    auto it = where_.find(name);
    check(it != where_.end(), who() + ": no parameter named '" + name + "'");
    return it->second;
  }

  cudaStream_t stream() const { return ctx_.impl().stream; }
  cublasHandle_t blas() const { return ctx_.impl().blas; }
  StepScalars* scalars() const { return scalars_.data(); }

  Context& ctx_;

 private:
  struct GradientBatch {
    DevicePointers ptrs;
    std::int64_t count = 0;  // elements per matrix
    std::size_t batch = 0;
  };

  StepScalars read_scalars() const {
    PION_CUDA_CHECK(cudaStreamSynchronize(stream()));
    StepScalars s{};
    PION_CUDA_CHECK(cudaMemcpy(&s, scalars_.data(), sizeof(s), cudaMemcpyDeviceToHost));
    return s;
  }

  DeviceArray<StepScalars> scalars_;
  std::vector<GradientBatch> gradients_;
  bool finite_check_ = true;
  std::map<std::string, std::pair<std::size_t, std::size_t>> where_;  // name -> (group, slot)
};

// "fp32" -> false; what_else -> true; anything else throws naming both choices.
inline bool parse_precision(const std::string& value, const std::string& what_else,
                            const std::string& who) {
  if (value == "fp32") return false;
  if (value == what_else) return true;
  throw Error(who + ": unknown precision '" + value + "'; choose fp32 or " + what_else);
}

}  // namespace pion::cuda::detail
