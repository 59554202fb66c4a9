#include "pion/train/trainer.h"

#include <cblas.h>
#include <omp.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <limits>

#include "pion/core/error.h"
#include "pion/core/safetensors.h"
#include "pion/model/init.h"
#include "pion/optim/schedule.h"
#include "pion/train/build_optimizer.h"
#include "pion/train/metrics.h"

namespace pion {

namespace {

std::atomic<bool> g_interrupted{false};

extern "C" void on_sigint(int) {
  if (g_interrupted.exchange(true)) std::_Exit(130);  // a second Ctrl-C: leave now
}

// Installs the SIGINT handler for the lifetime of a training run.
class SigintGuard {
 public:
  SigintGuard() {
    g_interrupted = false;
    previous_ = std::signal(SIGINT, on_sigint);
  }
  ~SigintGuard() { std::signal(SIGINT, previous_); }
  SigintGuard(const SigintGuard&) = delete;
  SigintGuard& operator=(const SigintGuard&) = delete;

 private:
  void (*previous_)(int) = SIG_DFL;
};

constexpr const char* kCheckpointFormat = "pion-train-checkpoint-v1";

double grad_norm(const Tensor& grads) {
  const float* g = grads.data<float>();
  const std::int64_t n = grads.numel();
  double sum = 0.0;
#pragma omp parallel for reduction(+ : sum) schedule(static)
  for (std::int64_t i = 0; i < n; ++i) sum += static_cast<double>(g[i]) * g[i];
  return std::sqrt(sum);
}

void scale(Tensor& t, float factor) {
  float* p = t.data<float>();
  const std::int64_t n = t.numel();
#pragma omp parallel for schedule(static)
  for (std::int64_t i = 0; i < n; ++i) p[i] *= factor;
}

nlohmann::json rng_json(const Rng& rng) {
  auto s = rng.state();
  return nlohmann::json::array({s[0], s[1], s[2], s[3]});
}
void restore_rng(Rng& rng, const nlohmann::json& j) {
  rng.set_state({j.at(0).get<std::uint64_t>(), j.at(1).get<std::uint64_t>(),
                 j.at(2).get<std::uint64_t>(), j.at(3).get<std::uint64_t>()});
}

nlohmann::json spectra_json(const std::vector<Param>& params) {
  nlohmann::json out = nlohmann::json::array();
  for (const auto& s : hidden_spectra(params))
    out.push_back({{"name", s.name}, {"rows", s.rows}, {"cols", s.cols}, {"sigma", s.sigma}});
  return out;
}

void write_json_file(const std::string& path, const nlohmann::json& j) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp);
    out << j.dump(2) << "\n";
    check(static_cast<bool>(out), "cannot write '" + tmp + "' (disk full?)");
  }
  std::filesystem::rename(tmp, path);
}

struct Progress {
  int step = 0;
  double best_val_loss = std::numeric_limits<double>::infinity();
  double last_val_loss = std::numeric_limits<double>::quiet_NaN();
  double tokens_seen = 0.0;
  double wall_seconds = 0.0;  // training time before this process (resumed runs)
};

void save_checkpoint(const std::string& path, const TrainConfig& config, Llama<float>& model,
                     const OptimizerSet& optimizers, const BatchSource& source,
                     const Progress& progress, const nlohmann::json& extra) {
  TensorFile file;
  model.save_weights(file, "model.");
  optimizers.save_state(file);
  nlohmann::json meta = {{"format", kCheckpointFormat},
                         {"step", progress.step},
                         {"best_val_loss", std::isfinite(progress.best_val_loss)
                                               ? nlohmann::json(progress.best_val_loss)
                                               : nlohmann::json(nullptr)},
                         {"tokens_seen", progress.tokens_seen},
                         {"wall_seconds", progress.wall_seconds},
                         {"data_state", source.state()},
                         {"dropout_rng", rng_json(model.dropout_rng())}};
  file.metadata["pion.train"] = meta.dump();
  file.metadata["pion.config"] = config.to_json().dump();
  file.metadata["pion.model_config"] = model.config().to_json().dump();
  file.metadata["pion.extra"] = extra.dump();
  save_safetensors(path, file);
}

}  // namespace

bool interrupt_requested() {
  return g_interrupted.load();
}

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
          {"interrupted", interrupted}};
}

TrainSummary run_training(TrainInputs in, Llama<float>& model) {
  const TrainConfig& cfg = in.config;
  cfg.validate();
  check(in.train_source != nullptr, "run_training: no training data source");
  BatchSource& source = *in.train_source;
  std::filesystem::create_directories(cfg.out_dir);
  if (cfg.threads > 0) {
    omp_set_num_threads(cfg.threads);
    openblas_set_num_threads(cfg.threads);
  }

  std::vector<Param> params = model.named_params();
  OptimizerSet optimizers = build_optimizers(cfg, params);
  auto schedule = make_schedule(cfg.schedule, cfg.warmup_iters, cfg.max_iters, cfg.min_lr_ratio);
  const std::string ckpt = checkpoint_path(cfg.out_dir);
  Progress progress;

  if (in.resume) {
    check(std::filesystem::exists(ckpt), "--resume: no checkpoint at '" + ckpt +
                                             "'; start without --resume or point out_dir at a run");
    TensorFile file = load_safetensors(ckpt);
    auto meta_it = file.metadata.find("pion.train");
    check(meta_it != file.metadata.end(), "'" + ckpt + "' is not a pion training checkpoint");
    const auto meta = nlohmann::json::parse(meta_it->second);
    check(meta.value("format", "") == kCheckpointFormat,
          "'" + ckpt + "' has an unknown checkpoint format");
    const auto saved_model = nlohmann::json::parse(file.metadata.at("pion.model_config"));
    check(
        saved_model == model.config().to_json(),
        "--resume: the checkpoint's model shape differs from the config's: " + saved_model.dump());
    model.load_weights(file, "model.");
    optimizers.load_state(file);
    source.restore(meta.at("data_state"));
    restore_rng(model.dropout_rng(), meta.at("dropout_rng"));
    progress.step = meta.at("step").get<int>();
    if (!meta.at("best_val_loss").is_null())
      progress.best_val_loss = meta.at("best_val_loss").get<double>();
    progress.tokens_seen = meta.at("tokens_seen").get<double>();
    progress.wall_seconds = meta.at("wall_seconds").get<double>();
    std::cout << "resumed from " << ckpt << " at step " << progress.step << "\n";
  } else if (!in.init_from.empty()) {
    TensorFile file = load_safetensors(in.init_from);
    model.load_weights(file, "model.");
    std::cout << "initialised weights from " << in.init_from << "\n";
  }

  write_json_file(cfg.out_dir + "/config.json", cfg.to_json());
  if (!in.resume) write_json_file(cfg.out_dir + "/spectrum_init.json", spectra_json(params));
  JsonlWriter metrics(cfg.out_dir + "/metrics.jsonl", in.resume);
  SigintGuard sigint;

  const int B = cfg.batch_size, T = cfg.seq_len;
  const double tokens_per_step = static_cast<double>(B) * T * cfg.grad_accum;
  std::vector<std::int32_t> inputs, targets;
  TrainSummary summary;
  using Clock = std::chrono::steady_clock;
  const auto run_start = Clock::now();
  double train_seconds = 0.0;  // this process's time in training steps (not evals)
  int steps_this_run = 0;
  double window_seconds = 0.0, window_tokens = 0.0,
         last_loss = std::numeric_limits<double>::quiet_NaN();

  auto evaluate = [&](nlohmann::json& record) {
    if (!in.evaluate) return;
    model.set_training(false);
    const double val = in.evaluate(model);
    model.set_training(true);
    progress.last_val_loss = val;
    progress.best_val_loss = std::min(progress.best_val_loss, val);
    record["val_loss"] = val;
    record["spectrum_drift"] = max_spectrum_drift(optimizers);
    std::cout << "step " << progress.step << " | val loss " << val << " | best "
              << progress.best_val_loss << "\n";
  };

  model.set_training(true);
  auto should_stop = [&] {
    return interrupt_requested() || (in.stop_after > 0 && progress.step >= in.stop_after);
  };
  while (progress.step < cfg.max_iters && !should_stop()) {
    const auto t0 = Clock::now();
    optimizers.set_lr_factor(schedule->factor(progress.step));
    model.zero_grad();
    double loss = 0.0;
    for (int micro = 0; micro < cfg.grad_accum; ++micro) {
      source.next(inputs, targets);
      loss += model.forward(inputs, targets, B, T) / cfg.grad_accum;
      model.backward(1.0 / cfg.grad_accum);
    }
    const double norm = grad_norm(model.grads());
    if (cfg.grad_clip > 0 && std::isfinite(norm) && norm > cfg.grad_clip)
      scale(model.grads(), static_cast<float>(cfg.grad_clip / (norm + 1e-6)));
    const bool applied = optimizers.step();
    ++progress.step;
    ++steps_this_run;
    progress.tokens_seen += tokens_per_step;
    const double dt = std::chrono::duration<double>(Clock::now() - t0).count();
    train_seconds += dt;
    window_seconds += dt;
    window_tokens += tokens_per_step;
    last_loss = loss;

    const double lr_now = optimizers.optimizers().front()->groups().front().lr;
    nlohmann::json record = {
        {"step", progress.step},
        {"lr", lr_now},
        {"train_loss", std::isfinite(loss) ? nlohmann::json(loss) : nlohmann::json(nullptr)},
        {"grad_norm", std::isfinite(norm) ? nlohmann::json(norm) : nlohmann::json(nullptr)},
        {"tokens_per_sec", tokens_per_step / dt},
        {"elapsed_seconds",
         progress.wall_seconds + std::chrono::duration<double>(Clock::now() - run_start).count()},
        {"skipped", !applied}};
    if (!applied) std::cout << "step " << progress.step << ": non-finite gradient, step skipped\n";
    if (progress.step % cfg.log_interval == 0 || progress.step == cfg.max_iters) {
      const double tps = window_tokens / window_seconds;
      const double eta = (cfg.max_iters - progress.step) * (train_seconds / steps_this_run);
      std::cout << progress_line(progress.step, cfg.max_iters, loss, lr_now, tps, eta) << std::endl;
      window_seconds = window_tokens = 0.0;
    }
    const bool last = progress.step == cfg.max_iters;
    if ((cfg.eval_interval > 0 && progress.step % cfg.eval_interval == 0) || last) evaluate(record);
    metrics.write(record);
    if (cfg.checkpoint_interval > 0 && progress.step % cfg.checkpoint_interval == 0 && !last) {
      Progress snapshot = progress;
      snapshot.wall_seconds += std::chrono::duration<double>(Clock::now() - run_start).count();
      save_checkpoint(ckpt, cfg, model, optimizers, source, snapshot, in.extra_metadata);
    }
  }
  summary.interrupted = should_stop() && progress.step < cfg.max_iters;
  progress.wall_seconds += std::chrono::duration<double>(Clock::now() - run_start).count();
  save_checkpoint(ckpt, cfg, model, optimizers, source, progress, in.extra_metadata);
  if (summary.interrupted)
    std::cout << "interrupted: checkpoint saved to " << ckpt << "; continue with --resume\n";

  write_json_file(cfg.out_dir + "/spectrum_final.json", spectra_json(params));
  summary.best_val_loss = progress.best_val_loss;
  summary.final_val_loss = progress.last_val_loss;
  summary.final_train_loss = last_loss;
  summary.iters = progress.step;
  summary.tokens_per_sec =
      steps_this_run > 0 ? steps_this_run * tokens_per_step / train_seconds : 0.0;
  summary.wall_seconds = progress.wall_seconds;
  summary.spectrum_drift_max = max_spectrum_drift(optimizers);
  summary.skipped_steps = optimizers.skipped_steps();
  write_json_file(cfg.out_dir + "/summary.json", summary.to_json());
  return summary;
}

}  // namespace pion
