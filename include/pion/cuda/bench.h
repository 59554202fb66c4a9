#pragma once
// Timing on the GPU for benchmarks (`pion bench optim --device cuda`): CUDA-event timers over
// a Context's stream, timed replays of the Context's captured graph, and the cuBLAS GEMM
// rates that set an optimizer step's roofline. Plain C++17 without CUDA types, like
// runtime.h; the definitions live in cuda/bench.cu. Every CUDA or cuBLAS failure throws
// pion::Error naming the call.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "pion/cuda/runtime.h"

namespace pion::cuda {

// Times intervals of the work queued on a Context's stream with CUDA events, without
// synchronising between intervals: start() and stop() record an event pair around the work
// of one interval (at most `capacity` intervals), elapsed_ms() waits for the last stop and
// returns each interval's GPU time in milliseconds, then the timer is empty again. Intervals
// queued back to back keep the GPU busy, so host launch latency does not enter the figures.
// Never use inside a graph capture.
class EventTimer {
 public:
  EventTimer(Context& ctx, std::size_t capacity);
  ~EventTimer();
  EventTimer(const EventTimer&) = delete;
  EventTimer& operator=(const EventTimer&) = delete;

  void start();
  void stop();
  std::vector<double> elapsed_ms();

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

// Ends a stream capture that failed part-way (a call inside it threw), discarding what was
// recorded, so the stream can be used eagerly again; nothing when no capture is under way.
// The Context's previously instantiated graph (if any) is left as it was. Never throws.
void discard_capture(Context& ctx) noexcept;

// Replays the Context's captured graph `warmup` times untimed, then `reps` times back to
// back, each replay between its own event pair; returns the GPU milliseconds of each timed
// replay (and has waited for all of them).
std::vector<double> time_graph_replays(Context& ctx, int warmup, int reps);

// How a benchmark GEMM runs, as the optimizers' GEMMs do (cuda/gemm.cuh):
//   "fp32": fp32 data, CUBLAS_COMPUTE_32F (plain fp32 on CUDA cores, no TF32),
//   "tf32": fp32 data, CUBLAS_COMPUTE_32F_FAST_TF32 (TF32 tensor cores, fp32 accumulate),
//   "bf16": bf16 data in and out, CUBLAS_COMPUTE_32F (bf16 tensor cores, fp32 accumulate).
struct GemmShape {
  std::int64_t m = 0, n = 0, k = 0;  // C (m x n) = op(A) (m x k) op(B) (k x n), row-major
  std::int64_t batch = 1;            // independent products in one cuBLAS call
  bool trans_a = false;              // A is stored k x m (op(A) = A^T)
  bool trans_b = false;              // B is stored n x k (op(B) = B^T)
};

// GEMM flops of one call: 2 m n k per product.
inline double gemm_flops(const GemmShape& s) {
  return 2.0 * static_cast<double>(s.m) * static_cast<double>(s.n) * static_cast<double>(s.k) *
         static_cast<double>(s.batch);
}

// Times C = A B on random operands (uniform in [-1, 1)) on the Context's stream: one
// cublasGemmEx call for batch 1, one cublasGemmStridedBatchedEx call otherwise (the slices of
// one buffer, as the optimizers call it over an evenly spaced shape group). `warmup` untimed calls,
// then `reps` calls back to back, each between its own event pair; returns each timed call's
// milliseconds. Throws pion::Error for an unknown precision or a non-positive size.
std::vector<double> time_gemm(Context& ctx, const GemmShape& shape, const std::string& precision,
                              int warmup, int reps);

}  // namespace pion::cuda
