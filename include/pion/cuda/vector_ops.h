#pragma once
// Whole-buffer passes the GPU trainer needs around the model and the optimizers: zeroing on
// the stream, the squared norm of the gradient buffer (for clipping and logging), scaling.
// Plain C++17 with no CUDA types (see runtime.h); kernels in cuda/model/vector_ops.cu.
// Like layers.h: each call queues work on the Context's stream and returns (no host sync,
// no allocation), except DeviceScalars::read.
#include <cstdint>
#include <vector>

#include "pion/cuda/runtime.h"

namespace pion::cuda {

// Owns count doubles of device memory: results of reductions, read back on demand.
class DeviceScalars {
 public:
  explicit DeviceScalars(std::size_t count);
  ~DeviceScalars();
  DeviceScalars(const DeviceScalars&) = delete;
  DeviceScalars& operator=(const DeviceScalars&) = delete;
  double* data() { return ptr_; }
  std::size_t size() const { return count_; }
  // Waits for ctx's stream and copies every value back.
  std::vector<double> read(Context& ctx) const;

 private:
  double* ptr_ = nullptr;
  std::size_t count_ = 0;
};

// x[0, count) = 0, queued on the stream (cudaMemsetAsync).
void fill_zero(Context& ctx, float* x, std::int64_t count);
// out[slot] = sum of x[i]^2 in double, in a fixed order (two passes, no atomics: the same
// bits every run). A NaN or Inf anywhere makes it non-finite, which is how the trainer
// detects a bad gradient.
void sum_squares(Context& ctx, DeviceScalars& out, std::size_t slot, const float* x,
                 std::int64_t count);
// x *= factor.
void scale_inplace(Context& ctx, float* x, std::int64_t count, float factor);

}  // namespace pion::cuda
