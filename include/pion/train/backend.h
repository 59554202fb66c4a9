#pragma once
// The back-end interface of the training loop: the few operations one training step needs,
// with one implementation per back end (as llm.c and ggml keep one shape per back end):
//   CpuBackend  (pion/train/cpu_backend.h)  the CPU model and OptimizerSet; under mpirun the
//               gradient all-reduce in per-layer buckets and the sharded optimizer
//   CudaBackend (pion/cuda/backend.h)       CudaLlama and the CUDA optimizers, with a CPU
//               mirror that checkpoints are written from and read into
// run_training (pion/train/trainer.h) drives either: schedule, batches, clipping, the NaN/Inf
// skip, metrics, evals, checkpoints, stop signals and the summary are written once, there.
//
// One step, as run_training calls it:
//   set_lr_factor(schedule(step)); zero_grad()
//   grad_accum x forward_backward(batch, 1 / grad_accum, last)   -> the micro-batch's loss
//   finish_grads()                 (waits for the gradient all-reduce under mpirun)
//   norm = grad_norm(); maybe scale_grads(clip / norm)
//   finite norm ? step() : skip_step()
//
// RL (GRPO, `pion rl`) is another batch source whose micro-batches carry a per-target
// objective (MicroBatch::objective) into forward_backward, which both back ends apply the same
// way; it samples completions through the back end's policy_sampler(), so they come from the
// weights being trained wherever those live. Data parallelism on GPUs (NCCL) is CudaBackend's
// finish_grads and step, as MPI is CpuBackend's.
#include <cstdint>
#include <functional>
#include <nlohmann/json.hpp>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "pion/core/random.h"
#include "pion/core/safetensors.h"
#include "pion/model/config.h"
#include "pion/model/generate.h"
#include "pion/optim/optimizer.h"
#include "pion/train/checkpoint.h"

namespace pion {

// The mean loss of one batch [rows, seq] on some model (CPU or GPU); sets `counted` to the
// number of targets the mean is over.
using BatchLoss = std::function<double(std::span<const std::int32_t> inputs,
                                       std::span<const std::int32_t> targets, int rows, int seq,
                                       std::int64_t& counted)>;
// Validation: the mean loss over a fixed set of batches (the same every eval).
using Evaluator = std::function<double(const BatchLoss&)>;

// An RL objective of the current policy's per-target log-probs (pion/train/grpo.h): given
// log p(target) and the softmax's entropy at each position [rows * seq] (0 where target < 0),
// fills weights[i] = -d objective / d log p(target_i) and returns the objective's value. The
// back end then backpropagates sum_i weights[i] * (-log p(target_i)), whose gradient is the
// objective's. The weights need the forward's log-probs (the PPO ratio, the KL term), which
// is why they are a function rather than numbers in the batch.
using TargetObjective = std::function<double(std::span<const double> log_probs,
                                             std::span<const double> entropies,
                                             std::span<double> weights)>;

// Samples completions of `prompts` from the CURRENT weights of the model being trained (RL's
// sampling phase): generate_tokens's arguments and results (pion/model/generate.h), whatever
// the engine. CPU: generate_tokens on the model itself. CUDA: today the device's weights are
// copied into the host mirror and generate_tokens runs on the CPU; a CUDA generator over the
// back end's CudaLlama replaces that inside CudaBackend::policy_sampler (cuda_backend.cpp),
// with no change to the callers.
// Per-target log p(target) of batches under FIXED weights (RL's reference policy, for the KL
// term): inputs and targets [rows, seq] -> log_probs [rows * seq] (0 where target < 0).
using TargetScorer =
    std::function<void(std::span<const std::int32_t> inputs, std::span<const std::int32_t> targets,
                       int rows, int seq, std::span<double> log_probs)>;

using PolicySampler =
    std::function<std::vector<Generation>(std::span<const std::vector<std::int32_t>> prompts,
                                          const GenerateOptions& options, std::span<Rng> rngs)>;

// One micro-batch of this process: inputs and targets [rows, seq]; targets < 0 are ignored
// by the loss (prompt tokens in finetuning, padding).
struct MicroBatch {
  std::span<const std::int32_t> inputs;
  std::span<const std::int32_t> targets;
  int rows = 0;
  int seq = 0;
  // Empty: the mean cross-entropy. Set (RL): the objective above, already normalised as the
  // micro-batch's share of the step's loss, so forward_backward applies `weight` to it
  // unchanged and returns its value summed over ranks. Both back ends: forward, the
  // objective of the per-target log-probs (the CPU model's, or the GPU's in double), backward
  // of the weighted cross-entropy its weights define.
  TargetObjective objective;
};

// What a back end measured over a run, for the summary (this process's figures).
struct BackendCosts {
  double optimizer_state_bytes = 0.0;
  double optimizer_seconds = 0.0;      // wall time of step() / skip_step()
  double optimizer_cpu_seconds = 0.0;  // CPU time (all threads) of the same; 0 on a GPU
  double sync_seconds = 0.0;           // waiting for collectives (0 in one process)
};

class TrainBackend {
 public:
  virtual ~TrainBackend() = default;

  virtual const ModelConfig& model_config() const = 0;
  // This process's rows of the global batch (batch_size / ranks).
  virtual int local_rows(int global_rows) const = 0;

  // Before begin(): weights from a file's model.* tensors (finetuning's init_from), or a
  // whole checkpoint (weights, optimizer state, dropout RNG) for --resume.
  virtual void load_weights(const TensorFile& file) = 0;
  virtual void load_checkpoint(const ResumePoint& point) = 0;
  // Once, after any load and before the first step: device copies, buckets; prints what
  // runs where. `benchmark_only`: no spectra will be asked for (no SVDs at start).
  virtual void begin(bool benchmark_only) = 0;

  virtual void set_lr_factor(double factor) = 0;
  // The learning rate of the first param group now (for the progress line).
  virtual double lr() const = 0;
  virtual void zero_grad() = 0;
  // Forward and backward of one micro-batch; the gradient accumulates `weight` times the
  // gradient of the global batch's mean loss. Returns that mean loss. `last`: the step's last
  // micro-batch (gradient communication may start during its backward).
  virtual double forward_backward(const MicroBatch& batch, double weight, bool last) = 0;
  // Makes the accumulated gradient final and the same everywhere (all-reduce under mpirun).
  virtual void finish_grads() = 0;
  virtual double grad_norm() = 0;
  virtual void scale_grads(float factor) = 0;
  // One optimizer step; false if the optimizers skipped it. skip_step() leaves weights and
  // state untouched and counts the step as skipped.
  virtual bool step() = 0;
  virtual void skip_step() = 0;
  virtual std::int64_t skipped_steps() const = 0;

  // The validation loss of the current weights (training mode off during it).
  virtual double evaluate(const Evaluator& evaluator) = 0;
  // After begin(): a sampler over the current weights (PolicySampler above), valid while the
  // back end lives.
  virtual PolicySampler policy_sampler() = 0;
  // After begin(): a scorer of `frozen`'s weights as they are now, computed where and as this
  // back end computes the training forward (same device, precision and kernels), so a policy
  // equal to `frozen` gets the very same log-probs: RL's KL to the reference is exactly 0 until
  // the policy moves, on either device. CPU: runs on `frozen`, which must outlive the scorer;
  // CUDA: a forward-only device copy of its weights.
  virtual TargetScorer frozen_scorer(Llama<float>& frozen) = 0;
  // After begin(): makes the host model the back end was built over hold the current weights,
  // for code that reads that model between steps (RL's held-out exact match). CPU: it is the
  // model, nothing to do; CUDA: a download of the weights (the mirror's optimizer state is left
  // for checkpoint_tensors).
  virtual void sync_host_weights() = 0;
  // The largest relative drift of a Pion matrix's spectrum; nullopt when the back end
  // leaves it out at evals (`at_eval`) because it costs too much there.
  virtual std::optional<double> spectrum_drift(bool at_eval) = 0;
  // The hidden matrices' singular values now (spectra_json of the current weights).
  virtual nlohmann::json spectra() = 0;

  // Weights and optimizer state under the checkpoint's names (checkpoint.h), and the dropout
  // RNG. A collective under mpirun: every rank calls it, rank 0 alone gets the file.
  virtual std::optional<TensorFile> checkpoint_tensors() = 0;
  virtual const Rng& dropout_rng() const = 0;

  virtual BackendCosts costs() const = 0;
  // Adds what is particular to this back end to summary.json and prints it (device, memory).
  virtual void annotate_summary(nlohmann::json& summary) const = 0;
};

}  // namespace pion
