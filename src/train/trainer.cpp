// The one training loop (pion/train/trainer.h) over a back end (pion/train/backend.h).
#include "pion/train/trainer.h"

#include <chrono>
#include <cmath>
#include <filesystem>
#include <iostream>
#include <limits>
#include <optional>

#include "pion/core/error.h"
#include "pion/dist/communicator.h"
#include "pion/optim/schedule.h"
#include "pion/train/checkpoint.h"
#include "pion/train/cpu_backend.h"
#include "pion/train/metrics.h"

namespace pion {

std::string checkpoint_path(const std::string& out_dir) {
  return (std::filesystem::path(out_dir) / "checkpoint.safetensors").string();
}

nlohmann::json TrainSummary::to_json() const {
  auto num = [](double v) {
    return std::isfinite(v) ? nlohmann::json(v) : nlohmann::json(nullptr);
  };
  return {{"best_val_loss", num(best_val_loss)},
          {"final_val_loss", num(final_val_loss)},
          {"final_train_loss", num(final_train_loss)},
          {"iters", iters},
          {"tokens_per_sec", tokens_per_sec},
          {"wall_seconds", wall_seconds},
          {"spectrum_drift_max", spectrum_drift_max},
          {"skipped_steps", skipped_steps},
          {"interrupted", interrupted},
          {"world_size", world_size},
          {"optimizer_state_bytes_per_rank", optimizer_state_bytes},
          {"optimizer_step_ms_per_rank", optimizer_step_ms},
          {"optimizer_step_cpu_ms_per_rank", optimizer_step_cpu_ms},
          {"communication_ms_per_rank", sync_ms}};
}

TrainSummary run_training(TrainInputs in, Llama<float>& model) {
  in.config.validate();
  std::unique_ptr<TrainBackend> backend = make_cpu_backend(in.config, model);
  return run_training(std::move(in), *backend);
}

TrainSummary run_training(TrainInputs in, TrainBackend& backend) {
  const TrainConfig& cfg = in.config;
  cfg.validate();
  check(in.train_source != nullptr, "run_training: no training data source");
  BatchSource& source = *in.train_source;
  dist::Communicator& comm = dist::world();
  const int world = comm.size();
  const bool root = comm.is_root();
  check(cfg.batch_size % world == 0, "batch_size " + std::to_string(cfg.batch_size) +
                                         " is the global batch and must divide "
                                         "evenly among the " +
                                         std::to_string(world) + " ranks; pick a multiple of " +
                                         std::to_string(world));
  if (root) std::filesystem::create_directories(cfg.out_dir);

  auto schedule = make_schedule(cfg.schedule, cfg.warmup_iters, cfg.max_iters, cfg.min_lr_ratio);
  const std::string ckpt = checkpoint_path(cfg.out_dir);
  comm.set_timeout(in.collective_timeout, ckpt);
  TrainProgress progress;

  if (in.resume) {
    ResumePoint point = read_train_checkpoint(ckpt, backend.model_config());
    backend.load_checkpoint(point);
    source.restore(point.data_state);
    progress = point.progress;
    std::cout << "resumed from " << ckpt << " at step " << progress.step << "\n";
  } else if (!in.init_from.empty()) {
    backend.load_weights(load_safetensors(in.init_from));
    std::cout << "initialised weights from " << in.init_from << "\n";
  }
  backend.begin(in.benchmark_only);
  source.attach(backend);

  if (root) {
    write_json_file(cfg.out_dir + "/config.json", cfg.to_json());
    if (!in.resume && !in.benchmark_only)
      write_json_file(cfg.out_dir + "/spectrum_init.json", backend.spectra());
  }
  std::optional<JsonlWriter> metrics;
  if (root) {
    const std::string path = cfg.out_dir + "/metrics.jsonl";
    metrics.emplace(in.resume ? JsonlWriter::resume(path, progress.step)
                              : JsonlWriter::create(path));
  }
  StopSignalGuard stop_signals;
  const int T = cfg.seq_len, local_B = backend.local_rows(cfg.batch_size);
  const double tokens_per_step = static_cast<double>(cfg.batch_size) * T * cfg.grad_accum;
  std::vector<std::int32_t> inputs, targets;
  TrainSummary summary;
  summary.world_size = world;
  using Clock = std::chrono::steady_clock;
  const auto run_start = Clock::now();
  auto elapsed = [&] { return std::chrono::duration<double>(Clock::now() - run_start).count(); };
  StepLog step_log(cfg.max_iters, cfg.log_interval, tokens_per_step);
  double last_loss = std::numeric_limits<double>::quiet_NaN();

  auto evaluate = [&](nlohmann::json& record) {
    if (!in.evaluate) return;
    const double val = backend.evaluate(in.evaluate);
    progress.last_val_loss = val;
    progress.best_val_loss = std::min(progress.best_val_loss, val);
    record["val_loss"] = val;
    if (std::optional<double> drift = backend.spectrum_drift(true))
      record["spectrum_drift"] = *drift;
    std::cout << "step " << progress.step << " | val loss " << val << " | best "
              << progress.best_val_loss << "\n";
    if (in.extra_eval) {
      backend.sync_host_weights();  // it reads the host model (RL: exact match on the CPU)
      in.extra_eval(record);
    }
  };

  // Every rank must take the same decisions (a signal may reach the ranks at different times,
  // and their clocks differ): the stop flag and "a checkpoint is due" are all-reduced.
  int stopped_by = 0;  // the stop signal, once every rank knows of it
  auto should_stop = [&] {
    const int local = stop_signal();
    const int any = comm.distributed()
                        ? static_cast<int>(comm.allreduce_max(static_cast<double>(local)))
                        : local;
    if (any != 0) stopped_by = any;
    return any != 0 || (in.stop_after > 0 && progress.step >= in.stop_after);
  };
  auto last_save = Clock::now();
  int saved_step = -1;  // the step the checkpoint on disk holds (from this process)
  auto minutes_due = [&] {
    if (cfg.checkpoint_minutes <= 0) return false;
    const double minutes = std::chrono::duration<double>(Clock::now() - last_save).count() / 60.0;
    const bool local = minutes >= cfg.checkpoint_minutes;
    return comm.distributed() ? comm.allreduce_max(local ? 1.0 : 0.0) > 0 : local;
  };
  // Every rank calls this (the back end may gather sharded state); only rank 0 writes, with
  // the atomic writer, so a rank dying mid-save leaves the previous checkpoint intact.
  auto save = [&](const TrainProgress& snapshot) {
    std::optional<TensorFile> file = backend.checkpoint_tensors();
    // The data state on every rank: a source may gather its ranks' parts (RlSource's batch).
    const nlohmann::json data_state = source.state();
    if (file)
      write_train_checkpoint(ckpt, cfg, backend.model_config(), std::move(*file), snapshot,
                             data_state, backend.dropout_rng(), in.extra_metadata);
    saved_step = snapshot.step;
    last_save = Clock::now();
  };

  while (progress.step < cfg.max_iters && !should_stop()) {
    if (in.on_step) in.on_step(progress.step + 1, true);
    const auto t0 = Clock::now();
    backend.set_lr_factor(schedule->factor(progress.step));
    backend.zero_grad();
    double loss = 0.0;
    for (int micro = 0; micro < cfg.grad_accum; ++micro) {
      source.next(inputs, targets);
      // A source may fill fewer rows than the batch (RL leaves out rows that cannot train).
      const auto rows = static_cast<int>(inputs.size() / static_cast<std::size_t>(T));
      check(rows >= 1 && rows <= local_B && inputs.size() == static_cast<std::size_t>(rows) * T &&
                targets.size() == inputs.size(),
            "training: the batch source filled " + std::to_string(inputs.size()) +
                " inputs, not 1.." + std::to_string(local_B) + " rows of " + std::to_string(T));
      MicroBatch batch{inputs, targets, rows, T, source.objective()};
      const bool last_micro = micro + 1 == cfg.grad_accum;
      if (batch.objective)  // RL: already the micro-batch's share of the step's loss
        loss += backend.forward_backward(batch, 1.0, last_micro);
      else
        loss += backend.forward_backward(batch, 1.0 / cfg.grad_accum, last_micro) / cfg.grad_accum;
    }
    backend.finish_grads();
    // The gradient is the same everywhere now, so the norm, the clip and the NaN/Inf skip
    // below come out the same on every rank.
    const double norm = backend.grad_norm();
    if (cfg.grad_clip > 0 && std::isfinite(norm) && norm > cfg.grad_clip)
      backend.scale_grads(static_cast<float>(cfg.grad_clip / (norm + 1e-6)));
    bool applied = false;
    if (std::isfinite(norm))
      applied = backend.step();
    else
      backend.skip_step();  // weights and optimizer state untouched; counted
    ++progress.step;
    if (in.on_step) in.on_step(progress.step, false);
    progress.tokens_seen += tokens_per_step;
    const double dt = std::chrono::duration<double>(Clock::now() - t0).count();
    last_loss = loss;
    nlohmann::json record = step_log.finish_step(progress.step, backend.lr(), loss, norm, dt,
                                                 progress.wall_seconds + elapsed(), applied);
    source.annotate_step(record);
    const bool last = progress.step == cfg.max_iters;
    if ((cfg.eval_interval > 0 && progress.step % cfg.eval_interval == 0) || last) evaluate(record);
    if (metrics) metrics->write(record);
    // Periodic checkpoints (not at the last step: the final save below writes that one).
    // minutes_due() is a collective under mpirun, so every rank calls it at every step.
    const bool by_steps =
        cfg.checkpoint_interval > 0 && progress.step % cfg.checkpoint_interval == 0;
    const bool by_time = minutes_due();
    if ((by_steps || by_time) && !last && !in.benchmark_only) {
      TrainProgress snapshot = progress;
      snapshot.wall_seconds += elapsed();
      save(snapshot);
    }
  }
  summary.interrupted = should_stop() && progress.step < cfg.max_iters;
  progress.wall_seconds += elapsed();
  // The final checkpoint, unless a periodic one already holds this step (a stop right after).
  if (!in.benchmark_only && saved_step != progress.step) save(progress);
  if (summary.interrupted)
    std::cout << "interrupted"
              << (stopped_by != 0 ? " by " + signal_name(stopped_by) : std::string())
              << ": checkpoint saved to " << ckpt << " at step " << progress.step
              << "; continue with --resume\n";

  // Per-rank optimizer figures (the point of sharding: each about 1/N of one process's).
  const BackendCosts costs = backend.costs();
  const double steps = static_cast<double>(step_log.steps());
  auto per_step_ms = [&](double seconds) { return steps > 0 ? 1e3 * seconds / steps : 0.0; };
  summary.optimizer_state_bytes = comm.allgather(costs.optimizer_state_bytes);
  summary.optimizer_step_ms = comm.allgather(per_step_ms(costs.optimizer_seconds));
  summary.optimizer_step_cpu_ms = comm.allgather(per_step_ms(costs.optimizer_cpu_seconds));
  summary.sync_ms = comm.allgather(per_step_ms(costs.sync_seconds));
  const double drift = in.benchmark_only ? 0.0 : backend.spectrum_drift(false).value_or(0.0);
  for (int r = 0; r < world; ++r) {
    const auto i = static_cast<std::size_t>(r);
    std::cout << "rank " << r << ": optimizer state "
              << summary.optimizer_state_bytes[i] / (1 << 20) << " MiB, optimizer step "
              << summary.optimizer_step_ms[i] << " ms/step (CPU "
              << summary.optimizer_step_cpu_ms[i] << " ms)"
              << (world > 1 ? ", communication " + std::to_string(summary.sync_ms[i]) + " ms/step"
                            : "")
              << "\n";
  }

  if (root && !in.benchmark_only)
    write_json_file(cfg.out_dir + "/spectrum_final.json", backend.spectra());
  summary.best_val_loss = progress.best_val_loss;
  summary.final_val_loss = progress.last_val_loss;
  summary.final_train_loss = last_loss;
  summary.iters = progress.step;
  summary.tokens_per_sec = step_log.tokens_per_sec();
  summary.wall_seconds = progress.wall_seconds;
  summary.spectrum_drift_max = drift;
  summary.skipped_steps = backend.skipped_steps();
  nlohmann::json summary_json = summary.to_json();
  backend.annotate_summary(summary_json);
  if (root) write_json_file(cfg.out_dir + "/summary.json", summary_json);
  return summary;
}

}  // namespace pion
