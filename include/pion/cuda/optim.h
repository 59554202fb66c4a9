#pragma once
// Optimizers on the GPU: Pion (taylor2 retraction, fp32 or mixed precision), AdamW and Muon
// (Newton-Schulz in bf16 like the reference, or fp32 for parity with the CPU) with the math
// of the CPU classes in pion/optim/, over weights and gradients that already live in device
// memory. Plain C++17 without CUDA types (see runtime.h).
//
// A step queues kernels and cuBLAS calls on the Context's stream and returns: no host
// synchronisation, no device-to-host copy, no allocation. Everything a step reads that
// changes between steps lives on the device: the learning rate (written by set_lr), the
// step counters (AdamW's bias corrections read them there) and Pion's alpha. So one step
// can be captured into a CUDA graph and replayed with a new learning rate each time:
//
//   opt->set_lr(lr0); ctx.begin_capture(); opt->queue_step(); ctx.end_capture();
//   for each step: opt->set_lr(lr); ctx.launch_graph();      // set_lr is not captured
//
// Non-finite gradients: like Optimizer::step on the CPU, a step whose gradients hold a NaN or
// Inf anywhere (any parameter of this optimizer) leaves weights and state untouched and
// counts as skipped. The check runs on the device and the decision is read there by every
// kernel (no host round trip); skipped_steps() reports the count. A hybrid set of GPU
// optimizers checks each optimizer's own gradients only (the CPU OptimizerSet skips all
// optimizers when any gradient is bad).
//
// Matrices of equal shape are updated together: one batched cuBLAS call per GEMM of the
// formula and one launch per elementwise pass for the whole shape group (a GPT layer stack
// has three or four shapes, so Pion's step is about 4 x 7 batched GEMMs).
//
// State is kept per parameter under the CPU optimizer's names and slots (Pion: m_in, v_in,
// m_out, v_out, fewer for a one-sided or msign run, m and v for ambient momentum; AdamW: exp_avg,
// exp_avg_sq; Muon: momentum_buffer) and can be copied to and from the host with download_state /
// upload_state, row-major fp32 like the CPU tensors. Pion's CPU state also holds sigma0 (for
// re-anchoring and drift reports); the GPU class does not.
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "pion/cuda/runtime.h"
#include "pion/optim/options.h"

namespace pion::cuda {

// One trainable matrix (or vector: rows = 1) in device memory, row-major fp32.
struct DeviceParam {
  std::string name;
  float* value = nullptr;
  const float* grad = nullptr;
  std::int64_t rows = 0;
  std::int64_t cols = 0;
};

using HostState = std::map<std::string, std::vector<float>>;

class CudaOptimizer {
 public:
  virtual ~CudaOptimizer() = default;
  virtual std::string kind() const = 0;

  // Queues one update of every parameter with learning rate lr: set_lr(lr), queue_step().
  void step(double lr) {
    set_lr(lr);
    queue_step();
  }
  // Queues a write of lr into the optimizer's device-side learning rate. The value travels
  // as a kernel argument (copied at launch), so the host may call again at once.
  virtual void set_lr(double lr) = 0;
  // Queues one update that reads the learning rate and step counter from device memory:
  // this is what a CUDA graph captures.
  virtual void queue_step() = 0;
  // Queues a write of the gradient scale (0 <= scale <= 1; 1 until set): every step reads
  // each gradient times it, g * scale rounded to float, which is what scaling the gradients
  // in place first (the trainer's clip) would leave, without a pass over them. The gradients
  // themselves are left unscaled (Pion's lie and msign momenta, whose GEMMs read them, scale
  // them in place, and only when scale != 1). Like set_lr, a kernel argument written to the
  // device: a captured step reads each step's value. With scale <= 1, g * scale is finite
  // exactly when g is, so the non-finite check may look at the unscaled gradients.
  virtual void set_grad_scale(float scale) = 0;
  // Whether queue_step checks the gradients for NaN/Inf (on until turned off). A caller that
  // steps only after it has seen a finite gradient norm (the training loop) turns it off and
  // saves a read of every gradient per step. Applies to steps queued (or captured) after it.
  virtual void set_finite_check(bool on) = 0;

  // Steps applied and steps skipped for non-finite gradients, read from the device (these
  // synchronise the stream; never call them inside a step or a capture).
  virtual std::int64_t steps() const = 0;
  virtual std::int64_t skipped_steps() const = 0;
  // Restores the counters (resuming from a checkpoint; AdamW's bias corrections use steps).
  virtual void set_steps(std::int64_t steps, std::int64_t skipped_steps) = 0;

  // The state of one parameter under the CPU optimizer's names (synchronous copies).
  virtual HostState download_state(const std::string& param_name) const = 0;
  virtual void upload_state(const std::string& param_name, const HostState& state) = 0;
};

// The CPU optimizers' options (pion/optim/options.h: the same fields, defaults and checks)
// plus what only the GPU has. Pion: only the paper's E2 (retraction taylor2) runs on the GPU
// so far, without re-anchoring (reanchor_every 0); make_cuda_pion refuses other values. Every
// momentum / update_side / normalizer variant runs (cuda/optim/pion_cuda.cu).
struct CudaPionOptions : PionOptions {
  // "fp32": every GEMM in fp32 (the CPU's arithmetic up to summation order).
  // "mixed": the seven GEMMs on TF32 tensor cores (fp32 in and out, 10-bit mantissa
  // inputs), while W and every addition into it stay fp32. Each GEMM result reaches W
  // only multiplied by s = lr * alpha (the identity part of E2(sA) W E2(sA) is added
  // elementwise in fp32), so the tensor-core rounding perturbs W by about s ||A|| 2^-11
  // relative per step: the update is slightly less exact, the weights are not rounded.
  // The spectrum drift this adds is measured in tests/test_cuda_optim.cpp.
  std::string precision = "fp32";
  // Batched GEMMs over a shape group whose matrices are evenly spaced (the scratch always;
  // the weights and gradients when the model lays them out by shape, as CudaLlama does) go
  // through cublasGemmStridedBatchedEx; false keeps every group on pointer arrays
  // (cublasGemmBatchedEx), the layout-agnostic path the optimizer benchmark compares with
  // (the msign normalizer's Newton-Schulz on its own scratch is strided either way).
  bool strided_gemms = true;
};

using CudaAdamWOptions = AdamWOptions;

struct CudaMuonOptions : MuonOptions {
  // "bf16": Newton-Schulz on bf16 matrices with fp32 accumulation, as the reference
  // implementation runs it on GPUs (X is normalised in fp32 and then rounded to bf16; the
  // bf16 result is added to the fp32 weights). "fp32": the CPU class's arithmetic.
  std::string precision = "bf16";
};

// Throw pion::Error on bad options or parameters (same checks as the CPU classes). The
// Context and the parameters' device memory must outlive the optimizer.
std::unique_ptr<CudaOptimizer> make_cuda_pion(Context& ctx, std::vector<DeviceParam> params,
                                              const CudaPionOptions& options);
std::unique_ptr<CudaOptimizer> make_cuda_adamw(Context& ctx, std::vector<DeviceParam> params,
                                               const CudaAdamWOptions& options);
std::unique_ptr<CudaOptimizer> make_cuda_muon(Context& ctx, std::vector<DeviceParam> params,
                                              const CudaMuonOptions& options);

}  // namespace pion::cuda
