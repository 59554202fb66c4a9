// The GPU training loop (include/pion/cuda/trainer.h): src/train/trainer.cpp's loop for one
// process, with the model, gradients and optimizer state on the device and the CPU model and
// OptimizerSet used as the mirror that checkpoints are written from and read into.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <iostream>
#include <limits>
#include <map>
#include <optional>

#include "pion/core/error.h"
#include "pion/core/linalg.h"
#include "pion/cuda/llama.h"
#include "pion/cuda/optim.h"
#include "pion/cuda/optim_like.h"
#include "pion/cuda/trainer.h"
#include "pion/dist/communicator.h"
#include "pion/optim/pion.h"
#include "pion/optim/schedule.h"
#include "pion/train/build_optimizer.h"
#include "pion/train/checkpoint.h"
#include "pion/train/metrics.h"

namespace pion::cuda {

namespace {

// Drift at evals costs an fp64 SVD of every Pion matrix on the host; above this many Pion
// parameters it is left to the end of the run.
constexpr std::int64_t kDriftAtEvalMaxParams = 20'000'000;

// One CUDA optimizer for one param group of one CPU optimizer of the mirror set.
struct DeviceGroup {
  std::size_t optimizer = 0;  // index in the OptimizerSet
  std::size_t group = 0;
  std::string kind;
  std::vector<Param> params;  // the mirror's params (host views: names and shapes)
  double base_lr = 0.0;       // the group's peak lr (the schedule multiplies it)
  std::unique_ptr<CudaOptimizer> device;
};

class DeviceRun {
 public:
  DeviceRun(Context& ctx, const TrainConfig& cfg, Llama<float>& host, OptimizerSet& mirror)
      : ctx_(ctx), cfg_(cfg), host_(host), mirror_(mirror) {
    CudaLlamaOptions mo;
    mo.matmul = parse_matmul_precision(cfg.matmul_precision);
    mo.attention = choose_attention(cfg.attention, host.config(), cfg.batch_size);
    model_ = std::make_unique<CudaLlama>(ctx, host.config(), mo);
  }

  CudaLlama& model() { return *model_; }
  std::vector<DeviceGroup>& groups() { return groups_; }

  // One CUDA optimizer per non-empty param group, over the device copies of its params.
  void build_optimizers() {
    std::map<std::string, const ParamEntry*> entries;
    for (const auto& e : model_->layout()) entries[e.name] = &e;
    auto& opts = mirror_.optimizers();
    for (std::size_t i = 0; i < opts.size(); ++i) {
      for (std::size_t g = 0; g < opts[i]->groups().size(); ++g) {
        const ParamGroup& group = opts[i]->groups()[g];
        if (group.params.empty()) continue;
        std::vector<DeviceParam> dp;
        for (const auto& p : group.params) {
          const ParamEntry& e = *entries.at(p.name);
          const bool matrix = e.shape.size() == 2;
          dp.push_back({p.name, model_->params() + e.offset, model_->grads() + e.offset,
                        matrix ? e.shape[0] : 1, matrix ? e.shape[1] : e.numel()});
        }
        DeviceGroup d;
        d.optimizer = i;
        d.group = g;
        d.kind = opts[i]->kind();
        d.params = group.params;
        d.base_lr = group.base_lr;
        d.device = make_cuda_optimizer_like(ctx_, *opts[i], g, std::move(dp),
                                            {cfg_.pion_precision, cfg_.muon_precision});
        groups_.push_back(std::move(d));
      }
    }
  }

  // The spectrum each Pion matrix keeps: the mirror's sigma0 after a resume, else the
  // singular values of the weights now (before the first step, as the CPU Pion takes them).
  void capture_sigma0() {
    for (const auto& d : groups_) {
      if (d.kind != "pion") continue;
      const Optimizer& cpu = *mirror_.optimizers()[d.optimizer];
      for (const auto& p : d.params) {
        const StateMap* st = cpu.state(p.name);
        if (st != nullptr && st->count("sigma0") > 0)
          sigma0_[p.name] = st->at("sigma0").clone();
        else
          sigma0_[p.name] = singular_values(p.value.to(DType::F64)).to(DType::F32);
      }
    }
  }

  // Mirror -> device: weights, then every optimizer's state and counters.
  void upload_from_mirror() {
    model_->upload_params(
        {host_.params().data<float>(), static_cast<std::size_t>(host_.params().numel())});
    for (auto& d : groups_) {
      const Optimizer& cpu = *mirror_.optimizers()[d.optimizer];
      for (const auto& p : d.params) {
        const StateMap* st = cpu.state(p.name);
        if (st == nullptr) continue;
        HostState hs;
        for (const auto& [key, t] : *st) {
          if (key == "sigma0") continue;  // kept on the host (sigma0_)
          const float* v = t.data<float>();
          hs[key].assign(v, v + t.numel());
        }
        d.device->upload_state(p.name, hs);
      }
      d.device->set_steps(cpu.steps(), cpu.skipped_steps());
    }
  }

  // Device -> mirror: weights and optimizer state, so the mirror's save_state describes this
  // run exactly (sigma0 included), then the usual checkpoint.
  void download_to_mirror(std::int64_t skipped) {
    download_weights();
    for (auto& d : groups_) {
      Optimizer& cpu = *mirror_.optimizers()[d.optimizer];
      const std::int64_t steps = d.device->steps();
      if (steps > 0) {
        for (const auto& p : d.params) {
          StateMap state;
          for (auto& [key, values] : d.device->download_state(p.name)) {
            Tensor t = Tensor::empty(cpu.state_shape(key, p.value.shape()));
            check(static_cast<std::size_t>(t.numel()) == values.size(),
                  "--device cuda: state '" + key + "' of '" + p.name + "' has " +
                      std::to_string(values.size()) + " values, expected " +
                      std::to_string(t.numel()));
            std::copy(values.begin(), values.end(), t.data<float>());
            state[key] = std::move(t);
          }
          if (d.kind == "pion") state["sigma0"] = sigma0_.at(p.name).clone();
          cpu.set_state(p.name, std::move(state));
        }
      }
      cpu.set_counters(steps, skipped);
    }
    mirror_.set_skipped_steps(skipped);
  }

  void download_weights() {
    model_->download_params(
        {host_.params().data<float>(), static_cast<std::size_t>(host_.params().numel())});
  }

  std::int64_t pion_params() const {
    std::int64_t n = 0;
    for (const auto& d : groups_)
      if (d.kind == "pion")
        for (const auto& p : d.params) n += p.value.numel();
    return n;
  }

  // Largest drift over the Pion matrices, from the mirror's weights (download them first).
  double max_drift() const {
    double drift = 0.0;
    for (const auto& d : groups_)
      if (d.kind == "pion")
        for (const auto& p : d.params)
          drift = std::max(drift, relative_spectrum_drift(p.value, sigma0_.at(p.name)));
    return drift;
  }

  std::size_t state_bytes() const {
    std::size_t bytes = 0;
    for (const auto& d : groups_) {
      for (const auto& p : d.params) {
        const Shape s = p.value.shape();
        if (d.kind == "pion")
          bytes += 2 * (s[0] * s[0] + s[1] * s[1]) * sizeof(float);
        else if (d.kind == "muon")
          bytes += p.value.numel() * sizeof(float);
        else
          bytes += 2 * p.value.numel() * sizeof(float);
      }
    }
    return bytes;
  }

 private:
  Context& ctx_;
  const TrainConfig& cfg_;
  Llama<float>& host_;
  OptimizerSet& mirror_;
  std::unique_ptr<CudaLlama> model_;
  std::vector<DeviceGroup> groups_;
  std::map<std::string, Tensor> sigma0_;
};

// The optimizer step of every group: eager on the first call (CUDA loads kernels lazily, and
// capture must not), then captured once into a graph and replayed.
class StepLauncher {
 public:
  StepLauncher(Context& ctx, std::vector<DeviceGroup>& groups) : ctx_(ctx), groups_(groups) {}

  void step(double factor) {
    for (auto& d : groups_) d.device->set_lr(d.base_lr * factor);
    if (eager_steps_ == 0 || !use_graph_) {
      for (auto& d : groups_) d.device->queue_step();
      ++eager_steps_;
      return;
    }
    if (!captured_) {
      try {
        ctx_.begin_capture();
        for (auto& d : groups_) d.device->queue_step();
        ctx_.end_capture();
        captured_ = true;
      } catch (const std::exception& e) {
        ctx_.abort_capture();
        use_graph_ = false;
        std::cout << "note: the optimizer step could not be captured into a CUDA graph ("
                  << e.what() << "); stepping eagerly\n";
        for (auto& d : groups_) d.device->queue_step();
        return;
      }
    }
    ctx_.launch_graph();
  }

 private:
  Context& ctx_;
  std::vector<DeviceGroup>& groups_;
  int eager_steps_ = 0;
  bool captured_ = false;
  bool use_graph_ = true;
};

}  // namespace

TrainSummary run_training_cuda(TrainInputs in, Llama<float>& host_model) {
  const TrainConfig& cfg = in.config;
  cfg.validate();
  check(in.train_source != nullptr, "run_training_cuda: no training data source");
  check(!dist::world().distributed(),
        "--device cuda trains in one process: data parallelism across GPUs (NCCL) is not "
        "built yet; run without mpirun, or with --device cpu under mpirun");
  check(device_count() > 0,
        "--device cuda: no CUDA device is visible (cudaGetDeviceCount reports none); run on a "
        "machine with an NVIDIA GPU, or drop --device cuda to train on the CPU");
  BatchSource& source = *in.train_source;
  std::filesystem::create_directories(cfg.out_dir);

  Context ctx;
  std::vector<Param> params = host_model.named_params();
  OptimizerSet mirror = build_optimizers(cfg, params);
  auto schedule = make_schedule(cfg.schedule, cfg.warmup_iters, cfg.max_iters, cfg.min_lr_ratio);
  const std::string ckpt = checkpoint_path(cfg.out_dir);
  TrainProgress progress;

  if (in.resume) {
    ResumePoint point = read_train_checkpoint(ckpt, host_model.config());
    host_model.load_weights(point.file, "model.");
    mirror.load_state(point.file);
    source.restore(point.data_state);
    restore_rng(host_model.dropout_rng(), point.dropout_rng);
    progress = point.progress;
    std::cout << "resumed from " << ckpt << " at step " << progress.step << "\n";
  } else if (!in.init_from.empty()) {
    TensorFile file = load_safetensors(in.init_from);
    host_model.load_weights(file, "model.");
    std::cout << "initialised weights from " << in.init_from << "\n";
  }

  DeviceRun run(ctx, cfg, host_model, mirror);
  run.build_optimizers();
  if (!in.benchmark_only) run.capture_sigma0();
  run.upload_from_mirror();
  CudaLlama& model = run.model();
  std::cout << "device: " << device_description() << " | matmul " << cfg.matmul_precision
            << " | attention "
            << (model.options().attention == CudaAttention::Flash ? "flash" : "materialized")
            << " | " << model.num_params() << " parameters on the device\n";
  StepLauncher launcher(ctx, run.groups());
  std::int64_t skipped = mirror.skipped_steps();
  const bool drift_at_evals = !in.benchmark_only && run.pion_params() <= kDriftAtEvalMaxParams;

  auto save = [&](const TrainProgress& snapshot) {
    run.download_to_mirror(skipped);
    TensorFile file;
    host_model.save_weights(file, "model.");
    TensorFile state;
    mirror.save_state(state);
    for (auto& [name, t] : state.tensors) file.tensors[name] = t;
    for (auto& [key, value] : state.metadata) file.metadata[key] = value;
    write_train_checkpoint(ckpt, cfg, host_model.config(), std::move(file), snapshot,
                           source.state(), host_model.dropout_rng(), in.extra_metadata);
  };

  write_json_file(cfg.out_dir + "/config.json", cfg.to_json());
  if (!in.resume && !in.benchmark_only)
    write_json_file(cfg.out_dir + "/spectrum_init.json", spectra_json(params));
  const std::string metrics_path = cfg.out_dir + "/metrics.jsonl";
  JsonlWriter metrics = in.resume ? JsonlWriter::resume(metrics_path, progress.step)
                                  : JsonlWriter::create(metrics_path);
  StopSignalGuard stop_signals;
  const int B = cfg.batch_size, T = cfg.seq_len;
  const double tokens_per_step = static_cast<double>(B) * T * cfg.grad_accum;
  std::vector<std::int32_t> inputs, targets;
  TrainSummary summary;
  using Clock = std::chrono::steady_clock;
  const auto run_start = Clock::now();
  StepLog step_log(cfg.max_iters, cfg.log_interval, tokens_per_step);
  double optim_seconds = 0.0;
  double last_loss = std::numeric_limits<double>::quiet_NaN();

  const BatchLoss device_loss = [&model](std::span<const std::int32_t> x,
                                         std::span<const std::int32_t> y, int rows, int seq,
                                         std::int64_t& counted) {
    model.forward_backward(x, y, rows, seq, 0.0);
    const auto l = model.read_loss();
    counted = l.count;
    return l.loss;
  };
  auto evaluate = [&](nlohmann::json& record) {
    if (!in.evaluate) return;
    const double val = in.evaluate(device_loss);
    progress.last_val_loss = val;
    progress.best_val_loss = std::min(progress.best_val_loss, val);
    record["val_loss"] = val;
    if (drift_at_evals) {
      run.download_weights();
      record["spectrum_drift"] = run.max_drift();
    }
    std::cout << "step " << progress.step << " | val loss " << val << " | best "
              << progress.best_val_loss << "\n";
  };
  auto should_stop = [&] {
    return interrupt_requested() || (in.stop_after > 0 && progress.step >= in.stop_after);
  };
  // One process (no mpirun with --device cuda), so the periodic decisions are local.
  auto last_save = Clock::now();
  int saved_step = -1;  // the step the checkpoint on disk holds (from this process)
  auto minutes_due = [&] {
    return cfg.checkpoint_minutes > 0 &&
           std::chrono::duration<double>(Clock::now() - last_save).count() / 60.0 >=
               cfg.checkpoint_minutes;
  };
  auto save_now = [&] {
    TrainProgress snapshot = progress;
    snapshot.wall_seconds += std::chrono::duration<double>(Clock::now() - run_start).count();
    save(snapshot);
    saved_step = progress.step;
    last_save = Clock::now();
  };

  while (progress.step < cfg.max_iters && !should_stop()) {
    const auto t0 = Clock::now();
    const double factor = schedule->factor(progress.step);
    mirror.set_lr_factor(factor);
    model.zero_grad();
    double loss = 0.0;
    for (int micro = 0; micro < cfg.grad_accum; ++micro) {
      source.next(inputs, targets);
      model.forward_backward(inputs, targets, B, T, 1.0 / cfg.grad_accum);
      loss += model.read_loss().loss / cfg.grad_accum;
    }
    const double norm = model.grad_norm();  // synchronises: the backward pass is done
    if (cfg.grad_clip > 0 && std::isfinite(norm) && norm > cfg.grad_clip)
      model.scale_grads(static_cast<float>(cfg.grad_clip / (norm + 1e-6)));
    const auto t_opt0 = Clock::now();
    const bool applied = std::isfinite(norm);
    if (applied) {
      launcher.step(factor);
    } else {
      ++skipped;  // weights and optimizer state untouched, as on the CPU
    }
    ctx.synchronize();
    optim_seconds += std::chrono::duration<double>(Clock::now() - t_opt0).count();
    ++progress.step;
    progress.tokens_seen += tokens_per_step;
    const double dt = std::chrono::duration<double>(Clock::now() - t0).count();
    last_loss = loss;
    const double lr_now = mirror.optimizers().front()->groups().front().lr;
    nlohmann::json record = step_log.finish_step(
        progress.step, lr_now, loss, norm, dt,
        progress.wall_seconds + std::chrono::duration<double>(Clock::now() - run_start).count(),
        applied);
    const bool last = progress.step == cfg.max_iters;
    if ((cfg.eval_interval > 0 && progress.step % cfg.eval_interval == 0) || last) evaluate(record);
    metrics.write(record);
    // Periodic checkpoints (not at the last step: the final save below writes that one).
    const bool by_steps =
        cfg.checkpoint_interval > 0 && progress.step % cfg.checkpoint_interval == 0;
    if ((by_steps || minutes_due()) && !last && !in.benchmark_only) save_now();
  }
  summary.interrupted = should_stop() && progress.step < cfg.max_iters;
  progress.wall_seconds += std::chrono::duration<double>(Clock::now() - run_start).count();
  // The final checkpoint (which also leaves the final weights in host_model), unless a
  // periodic one already holds this step (a stop right after it; it left them there too).
  if (!in.benchmark_only && saved_step != progress.step) save(progress);
  if (summary.interrupted) {
    const int sig = stop_signal();
    std::cout << "interrupted" << (sig != 0 ? " by " + signal_name(sig) : std::string())
              << ": checkpoint saved to " << ckpt << " at step " << progress.step
              << "; continue with --resume\n";
  }

  const double drift = in.benchmark_only ? 0.0 : run.max_drift();
  const double step_ms = step_log.steps() > 0 ? 1e3 * optim_seconds / step_log.steps() : 0.0;
  summary.world_size = 1;
  summary.optimizer_state_bytes = {static_cast<double>(run.state_bytes())};
  summary.optimizer_step_ms = {step_ms};
  summary.optimizer_step_cpu_ms = {0.0};
  summary.sync_ms = {0.0};
  std::cout << "device optimizer state " << run.state_bytes() / double(1 << 20)
            << " MiB, optimizer step " << step_ms << " ms/step, model "
            << model.device_bytes() / double(1 << 30) << " GiB on the device\n";
  if (!in.benchmark_only)
    write_json_file(cfg.out_dir + "/spectrum_final.json", spectra_json(params));
  summary.best_val_loss = progress.best_val_loss;
  summary.final_val_loss = progress.last_val_loss;
  summary.final_train_loss = last_loss;
  summary.iters = progress.step;
  summary.tokens_per_sec = step_log.tokens_per_sec();
  summary.wall_seconds = progress.wall_seconds;
  summary.spectrum_drift_max = drift;
  summary.skipped_steps = skipped;
  nlohmann::json j = summary.to_json();
  j["device"] = device_description();
  write_json_file(cfg.out_dir + "/summary.json", j);
  return summary;
}

}  // namespace pion::cuda
