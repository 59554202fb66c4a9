#pragma once
// The one training loop, shared by `pion train` (pretraining on a token shard) and
// `pion finetune` (prompt/response pairs, loss on response tokens only), on the CPU and on the
// GPU: run_training drives a back end (pion/train/backend.h) through
//   for step in [start, max_iters):
//     lr = base_lr * schedule(step); zero grads
//     grad_accum x { batch <- source; loss += backend.forward_backward(batch, 1/grad_accum) }
//     clip the global gradient norm; step, or skip and count a step with a NaN/Inf gradient
//     log a progress line and a metrics.jsonl record; evaluate; checkpoint
// Pretraining and finetuning differ only in their BatchSource (finetuning's targets are -1
// on prompt tokens, so the loss counts responses) and their Evaluator.
// Checkpoints (out_dir/checkpoint.safetensors) hold the weights, the optimizer state, the
// data source's and dropout's RNG state, the step and the config, so --resume continues
// bit-exactly, on either back end. Checkpoints are also saved every checkpoint_interval steps
// and every checkpoint_minutes of wall time. SIGINT (Ctrl-C) or SIGTERM finishes the current
// step, saves a checkpoint and returns (StopSignalGuard below).
//
// Under `mpirun -np N` (pion/dist): batch_size is the GLOBAL batch; the CPU back end
// (cpu_backend.h) runs each rank's batch_size / N rows and reduces the gradients, every rank
// clips and checks the same reduced gradient and takes the same stop and checkpoint
// decisions (they are all-reduced here). Rank 0 alone prints, writes metrics, summary and
// checkpoints; checkpoints are identical whatever N, so a run can resume with another N.
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "pion/model/llama.h"
#include "pion/train/backend.h"
#include "pion/train/config.h"

namespace pion {

// Where batches come from. Implementations: pretraining windows of a token shard, and
// finetuning examples. State is a JSON value so a checkpoint can restore it.
class BatchSource {
 public:
  virtual ~BatchSource() = default;
  // Fills inputs and targets [rows, seq] (targets < 0 are ignored by the loss): rows is the
  // micro-batch's rows on this process, or fewer (at least 1) when the rest would add nothing
  // (RL's rows with zero weight).
  virtual void next(std::vector<std::int32_t>& inputs, std::vector<std::int32_t>& targets) = 0;
  // Called on every rank when the trainer saves (a collective for a source whose state is
  // spread over ranks); rank 0 writes what its call returns.
  virtual nlohmann::json state() const = 0;
  virtual void restore(const nlohmann::json& state) = 0;
  // RL: the objective of the micro-batch next() just filled (backend.h); empty (the default)
  // is the mean cross-entropy of pretraining and finetuning.
  virtual TargetObjective objective() { return {}; }
  // Called once by run_training after backend.begin(), before the first next(): a source that
  // needs the back end (RL samples through backend.policy_sampler()) keeps what it needs. The
  // back end outlives every later call of the source inside run_training.
  virtual void attach(TrainBackend& /*backend*/) {}
  // Adds this step's own figures (RL: rewards, KL, entropy) to its metrics.jsonl record.
  virtual void annotate_step(nlohmann::json& /*record*/) {}
};

struct TrainSummary {
  double best_val_loss = 0.0;
  double final_val_loss = 0.0;
  double final_train_loss = 0.0;
  int iters = 0;
  double tokens_per_sec = 0.0;
  double wall_seconds = 0.0;
  double spectrum_drift_max = 0.0;
  std::int64_t skipped_steps = 0;
  bool interrupted = false;
  // Data parallelism (mpirun): ranks, and per rank (index = rank) the optimizer state it
  // holds, its mean optimizer step time and its mean communication time per step
  // (gradient all-reduce wait + all-gather of updated weights).
  int world_size = 1;
  std::vector<double> optimizer_state_bytes;
  std::vector<double> optimizer_step_ms;
  std::vector<double> optimizer_step_cpu_ms;  // CPU time (all threads) of the step
  std::vector<double> sync_ms;
  nlohmann::json to_json() const;
};

struct TrainInputs {
  TrainConfig config;
  nlohmann::json extra_metadata;  // stored in the checkpoint (tokenizer path, mode, ...)
  std::unique_ptr<BatchSource> train_source;
  Evaluator evaluate;     // may be empty (no validation)
  // Called at each eval after the validation loss, with the step's record to add to (RL: the
  // held-out exact match). The host model (run_training's Llama<float>, the CUDA back end's
  // mirror) holds the current weights then (backend.sync_host_weights()). May be empty.
  std::function<void(nlohmann::json& record)> extra_eval;
  bool resume = false;    // continue from out_dir/checkpoint.safetensors
  std::string init_from;  // finetuning: start from these weights (fresh optimizer)
  int stop_after = 0;     // > 0: stop (with a checkpoint) once the step count reaches
                          // this, as if interrupted; --resume continues the schedule
  // Data parallelism: seconds a rank may wait in one collective before it ends the job
  // (another rank died or hangs). <= 0: wait forever.
  double collective_timeout = 600.0;
  // Called with begin = true before step `step` (1-based) starts, and with begin = false once
  // its optimizer update is queued (`pion bench train --profile_step`: a profiler range
  // around one step). May be empty.
  std::function<void(int step, bool begin)> on_step;
  // `pion bench train`: no checkpoint and no spectra or drift (they cost SVDs and disk, not
  // training time); metrics.jsonl and summary.json are still written.
  bool benchmark_only = false;
};

// The loop, on any back end (pion/train/backend.h): the CPU one (cpu_backend.h) or the CUDA
// one (pion/cuda/backend.h).
TrainSummary run_training(TrainInputs inputs, TrainBackend& backend);
// The loop on the CPU back end for `model`.
TrainSummary run_training(TrainInputs inputs, Llama<float>& model);

// The checkpoint file of a run directory.
std::string checkpoint_path(const std::string& out_dir);

// Stop signals: SIGINT (Ctrl-C) and SIGTERM (what cluster schedulers send before they kill a
// job) are handled alike. The first one sets a flag that the training loop checks between
// steps (it finishes the step, saves a checkpoint, writes summary.json and returns); a second
// one of either kind exits at once with status 128 + its number (130, 143).
//
// The signal that arrived first (SIGINT or SIGTERM), or 0 while none has.
int stop_signal();
// stop_signal() != 0.
bool interrupt_requested();
// "SIGINT", "SIGTERM", else "signal N".
std::string signal_name(int signal);
// Installs the handler for SIGINT and SIGTERM for its lifetime (and clears the flag); restores
// the previous handlers when destroyed.
class StopSignalGuard {
 public:
  StopSignalGuard();
  ~StopSignalGuard();
  StopSignalGuard(const StopSignalGuard&) = delete;
  StopSignalGuard& operator=(const StopSignalGuard&) = delete;

 private:
  void (*previous_int_)(int) = nullptr;
  void (*previous_term_)(int) = nullptr;
};

}  // namespace pion
