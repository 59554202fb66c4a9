#include "pion/train/trainer.h"

#include <cblas.h>
#include <omp.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <limits>
#include <optional>
#include <set>
#include <span>

#include "pion/core/error.h"
#include "pion/core/safetensors.h"
#include "pion/dist/communicator.h"
#include "pion/dist/shard.h"
#include "pion/model/init.h"
#include "pion/model/memory.h"
#include "pion/optim/schedule.h"
#include "pion/train/build_optimizer.h"
#include "pion/train/checkpoint.h"
#include "pion/train/metrics.h"

namespace pion {

namespace {

std::atomic<bool> g_interrupted{false};

extern "C" void on_sigint(int) {
  if (g_interrupted.exchange(true)) std::_Exit(130);  // a second Ctrl-C: leave now
}

// CPU seconds used by this process so far (all threads).
double process_cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

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

using Progress = TrainProgress;

// Every rank calls this (it gathers the sharded optimizer state); only rank 0 writes, with
// the atomic writer, so a rank dying mid-save leaves the previous checkpoint intact.
void save_checkpoint(const std::string& path, const TrainConfig& config, Llama<float>& model,
                     const OptimizerSet& optimizers, const dist::OptimizerLayout& layout,
                     const BatchSource& source, const Progress& progress,
                     const nlohmann::json& extra) {
  dist::Communicator& comm = dist::world();
  TensorFile state;
  optimizers.save_state(state);
  if (comm.distributed()) {
    std::vector<std::string> packed = comm.gather(dist::pack(state), 0);
    if (!comm.is_root()) return;
    std::vector<TensorFile> shards;
    for (const auto& bytes : packed) shards.push_back(dist::unpack(bytes));
    state = dist::merge_optimizer_states(shards, layout);
  }
  TensorFile file;
  model.save_weights(file, "model.");
  for (auto& [name, t] : state.tensors) file.tensors[name] = t;
  for (auto& [key, value] : state.metadata) file.metadata[key] = value;
  write_train_checkpoint(path, config, model.config(), std::move(file), progress, source.state(),
                         model.dropout_rng(), extra);
}

// Contiguous [offset, offset + count) ranges of the gradient buffer, one per layer, that
// backward finishes layer by layer (last layer first); what is left (embedding, final norm,
// LM head) is one more bucket reduced after backward. Empty when the layout is not
// layer-contiguous (then the whole buffer is reduced after backward).
struct Bucket {
  std::int64_t offset = 0, count = 0;
};
std::vector<Bucket> layer_buckets(const Llama<float>& model) {
  std::vector<Bucket> out(static_cast<std::size_t>(model.config().n_layer));
  std::vector<std::int64_t> summed(out.size(), 0);
  for (const auto& e : model.layout()) {
    if (e.name.rfind("layers.", 0) != 0) continue;
    const auto l = static_cast<std::size_t>(std::stoll(e.name.substr(7)));
    if (l >= out.size()) return {};
    Bucket& b = out[l];
    const std::int64_t end = std::max(b.offset + b.count, e.offset + e.numel());
    b.offset = summed[l] == 0 ? e.offset : std::min(b.offset, e.offset);
    b.count = end - b.offset;
    summed[l] += e.numel();
  }
  for (std::size_t l = 0; l < out.size(); ++l)
    if (summed[l] != out[l].count) return {};
  return out;
}

}  // namespace

bool interrupt_requested() {
  return g_interrupted.load();
}

SigintGuard::SigintGuard() {
  g_interrupted = false;
  previous_ = std::signal(SIGINT, on_sigint);
}

SigintGuard::~SigintGuard() {
  std::signal(SIGINT, previous_);
}

BatchLoss cpu_batch_loss(Llama<float>& model) {
  return [&model](std::span<const std::int32_t> inputs, std::span<const std::int32_t> targets,
                  int rows, int seq, std::int64_t& counted) {
    const double loss = model.forward(inputs, targets, rows, seq);
    counted = model.target_count();
    return loss;
  };
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
          {"interrupted", interrupted},
          {"world_size", world_size},
          {"optimizer_state_bytes_per_rank", optimizer_state_bytes},
          {"optimizer_step_ms_per_rank", optimizer_step_ms},
          {"optimizer_step_cpu_ms_per_rank", optimizer_step_cpu_ms},
          {"communication_ms_per_rank", sync_ms}};
}

TrainSummary run_training(TrainInputs in, Llama<float>& model) {
  const TrainConfig& cfg = in.config;
  cfg.validate();
  check(in.train_source != nullptr, "run_training: no training data source");
  // Refuses a batch whose activations cannot fit before the first forward() allocates them.
  check_batch_memory(model.config(), cfg.batch_size / dist::world().size(), cfg.seq_len, true,
                     "pion train");
  BatchSource& source = *in.train_source;
  dist::Communicator& comm = dist::world();
  const int world = comm.size(), rank = comm.rank();
  const bool root = comm.is_root();
  check(cfg.batch_size % world == 0, "batch_size " + std::to_string(cfg.batch_size) +
                                         " is the global batch and must divide "
                                         "evenly among the " +
                                         std::to_string(world) + " ranks; pick a multiple of " +
                                         std::to_string(world));
  if (root) std::filesystem::create_directories(cfg.out_dir);
  if (cfg.threads > 0) {
    omp_set_num_threads(cfg.threads);
    openblas_set_num_threads(cfg.threads);
  }

  std::vector<Param> params = model.named_params();
  // Sharded optimizer (dist/shard.h): the whole set only names the parameters (its state is
  // created lazily, so it costs nothing); this rank steps the ones the plan gives it.
  const OptimizerSet full_set = build_optimizers(cfg, params);
  const dist::OptimizerLayout layout = dist::layout_of(full_set);
  const dist::OwnershipPlan plan = dist::plan_ownership(full_set, world);
  std::set<std::string> owned;
  for (const auto& [name, r] : plan.owner)
    if (r == rank) owned.insert(name);
  OptimizerSet optimizers =
      build_optimizers(cfg, params, [&](const Param& p) { return owned.count(p.name) > 0; });
  // The ranges each owner broadcasts after its step (all-gather of updated weights).
  struct OwnedRange {
    std::span<float> values;
    int owner;
  };
  std::vector<OwnedRange> weight_ranges;
  for (auto& p : params)
    if (auto it = plan.owner.find(p.name); it != plan.owner.end())
      weight_ranges.push_back(
          {{p.value.data<float>(), static_cast<std::size_t>(p.value.numel())}, it->second});

  auto schedule = make_schedule(cfg.schedule, cfg.warmup_iters, cfg.max_iters, cfg.min_lr_ratio);
  const std::string ckpt = checkpoint_path(cfg.out_dir);
  comm.set_timeout(in.collective_timeout, ckpt);
  Progress progress;

  if (in.resume) {
    ResumePoint point = read_train_checkpoint(ckpt, model.config());
    model.load_weights(point.file, "model.");
    // The file holds every parameter's state whatever N it was saved with; keep ours.
    optimizers.load_state(world > 1 ? dist::shard_optimizer_state(point.file, layout, owned)
                                    : point.file);
    source.restore(point.data_state);
    restore_rng(model.dropout_rng(), point.dropout_rng);
    progress = point.progress;
    std::cout << "resumed from " << ckpt << " at step " << progress.step << "\n";
  } else if (!in.init_from.empty()) {
    TensorFile file = load_safetensors(in.init_from);
    model.load_weights(file, "model.");
    std::cout << "initialised weights from " << in.init_from << "\n";
  }
  if (rank > 0) {
    // Dropout masks must differ between ranks (their rows differ). Derived from rank 0's
    // stream, so a run is reproducible for a given N; with dropout on, runs with different N
    // (or resumed with another N) draw different masks.
    auto s = model.dropout_rng().state();
    model.dropout_rng() = Rng(s[0] ^ (0x9e3779b97f4a7c15ULL * static_cast<std::uint64_t>(rank)));
  }

  if (root) {
    write_json_file(cfg.out_dir + "/config.json", cfg.to_json());
    if (!in.resume && !in.benchmark_only)
      write_json_file(cfg.out_dir + "/spectrum_init.json", spectra_json(params));
  }
  std::optional<JsonlWriter> metrics;
  if (root) metrics.emplace(cfg.out_dir + "/metrics.jsonl", in.resume);
  SigintGuard sigint;
  const int B = cfg.batch_size, T = cfg.seq_len, local_B = B / world;
  const double tokens_per_step = static_cast<double>(B) * T * cfg.grad_accum;
  std::vector<std::int32_t> inputs, targets;
  TrainSummary summary;
  summary.world_size = world;
  using Clock = std::chrono::steady_clock;
  const auto run_start = Clock::now();
  StepLog step_log(cfg.max_iters, cfg.log_interval, tokens_per_step);
  double optim_seconds = 0.0, sync_seconds = 0.0;
  // CPU time of the optimizer step as well as wall time: on a shared machine, ranks that
  // compete for cores see wall times inflated by time-slicing, while CPU time measures the
  // work each rank does (what sharding divides).
  double optim_cpu_seconds = 0.0;
  double last_loss = std::numeric_limits<double>::quiet_NaN();

  // Gradient all-reduce in buckets: each layer's range starts reducing (MPI_Iallreduce) as
  // soon as backward has finished that layer, during the last micro-batch; the rest
  // (embedding, final norm, LM head) once backward returns. All are waited on before the
  // gradient norm. Local gradients are pre-scaled (see the loop), so the sum is the mean.
  float* grad_data = model.grads().data<float>();
  const std::int64_t grad_total = model.grads().numel();
  const std::vector<Bucket> buckets = world > 1 ? layer_buckets(model) : std::vector<Bucket>{};
  if (world > 1) {
    std::string loads;
    for (double l : plan.load)
      loads += (loads.empty() ? "" : " / ") + std::to_string(static_cast<long long>(l / 1e6)) + "M";
    std::cout << "data parallel: " << world << " ranks, " << local_B << " rows each; gradients "
              << (buckets.empty() ? std::string("all-reduced after backward")
                                  : "all-reduced in " + std::to_string(buckets.size() + 1) +
                                        " buckets, one per layer started during backward")
              << "; optimizer work sharded by cost (rank loads " << loads << ")\n";
  }
  auto start_layer_bucket = [&](int layer) {
    const Bucket& b = buckets[static_cast<std::size_t>(layer)];
    comm.start_allreduce_sum({grad_data + b.offset, static_cast<std::size_t>(b.count)});
    // MPI progresses non-blocking collectives only inside MPI calls: poke it per layer.
    comm.progress();
  };
  auto reduce_rest = [&] {
    if (buckets.empty()) {
      comm.allreduce_sum(std::span<float>(grad_data, static_cast<std::size_t>(grad_total)));
      return;
    }
    std::int64_t lo = grad_total, hi = 0;
    for (const auto& b : buckets) {
      lo = std::min(lo, b.offset);
      hi = std::max(hi, b.offset + b.count);
    }
    comm.start_allreduce_sum({grad_data, static_cast<std::size_t>(lo)});
    comm.start_allreduce_sum({grad_data + hi, static_cast<std::size_t>(grad_total - hi)});
    comm.wait_all();
  };

  auto evaluate = [&](nlohmann::json& record) {
    if (!in.evaluate) return;
    model.set_training(false);
    const double val = in.evaluate(cpu_batch_loss(model));
    model.set_training(true);
    progress.last_val_loss = val;
    progress.best_val_loss = std::min(progress.best_val_loss, val);
    record["val_loss"] = val;
    record["spectrum_drift"] = comm.allreduce_max(max_spectrum_drift(optimizers));
    std::cout << "step " << progress.step << " | val loss " << val << " | best "
              << progress.best_val_loss << "\n";
  };

  model.set_training(true);
  // Every rank must take the same decision (a Ctrl-C may reach the ranks at different times).
  auto should_stop = [&] {
    const bool local = interrupt_requested();
    const bool any = comm.distributed() ? comm.allreduce_max(local ? 1.0 : 0.0) > 0 : local;
    return any || (in.stop_after > 0 && progress.step >= in.stop_after);
  };
  while (progress.step < cfg.max_iters && !should_stop()) {
    const auto t0 = Clock::now();
    optimizers.set_lr_factor(schedule->factor(progress.step));
    model.zero_grad();
    double loss = 0.0;
    for (int micro = 0; micro < cfg.grad_accum; ++micro) {
      source.next(inputs, targets);
      const double local_loss = model.forward(inputs, targets, local_B, T);
      // The loss is the mean over the GLOBAL micro-batch: weight this rank's mean by its share
      // of the counted targets (exactly 1/N when every target counts, as in pretraining), so
      // the summed gradients are the global mean's, as in one process.
      double share = 1.0;
      if (comm.distributed()) {
        const double local_count = static_cast<double>(model.target_count());
        const double global_count = comm.allreduce_sum(local_count);
        share = global_count > 0 ? local_count / global_count : 0.0;
      }
      loss += comm.allreduce_sum(local_loss * share) / cfg.grad_accum;
      // Reduce during backward only on the last micro-batch: earlier ones still accumulate.
      const bool overlap = !buckets.empty() && micro + 1 == cfg.grad_accum;
      model.set_layer_grads_ready_hook(overlap ? std::function<void(int)>(start_layer_bucket)
                                               : std::function<void(int)>());
      model.backward(share / cfg.grad_accum);
    }
    const auto t_sync0 = Clock::now();
    if (comm.distributed()) reduce_rest();
    double sync = std::chrono::duration<double>(Clock::now() - t_sync0).count();
    // All ranks hold the same reduced gradients now, so the norm, the clip and the NaN/Inf
    // skip below come out the same everywhere.
    const double norm = grad_norm(model.grads());
    if (cfg.grad_clip > 0 && std::isfinite(norm) && norm > cfg.grad_clip)
      scale(model.grads(), static_cast<float>(cfg.grad_clip / (norm + 1e-6)));
    const auto t_opt0 = Clock::now();
    const double cpu0 = process_cpu_seconds();
    bool applied = false;
    if (std::isfinite(norm)) {
      applied = optimizers.step();
    } else {
      optimizers.skip_step();
    }
    const auto t_opt1 = Clock::now();
    optim_cpu_seconds += process_cpu_seconds() - cpu0;
    optim_seconds += std::chrono::duration<double>(t_opt1 - t_opt0).count();
    if (applied && comm.distributed()) {
      // All-gather of the updated weights: each parameter from its owner.
      for (auto& r : weight_ranges) comm.start_broadcast(r.values, r.owner);
      comm.wait_all();
    }
    sync += std::chrono::duration<double>(Clock::now() - t_opt1).count();
    sync_seconds += sync;
    ++progress.step;
    progress.tokens_seen += tokens_per_step;
    const double dt = std::chrono::duration<double>(Clock::now() - t0).count();
    last_loss = loss;
    const double lr_now = optimizers.optimizers().front()->groups().front().lr;
    nlohmann::json record = step_log.finish_step(
        progress.step, lr_now, loss, norm, dt,
        progress.wall_seconds + std::chrono::duration<double>(Clock::now() - run_start).count(),
        applied);
    const bool last = progress.step == cfg.max_iters;
    if ((cfg.eval_interval > 0 && progress.step % cfg.eval_interval == 0) || last) evaluate(record);
    if (metrics) metrics->write(record);
    if (cfg.checkpoint_interval > 0 && progress.step % cfg.checkpoint_interval == 0 && !last) {
      Progress snapshot = progress;
      snapshot.wall_seconds += std::chrono::duration<double>(Clock::now() - run_start).count();
      save_checkpoint(ckpt, cfg, model, optimizers, layout, source, snapshot, in.extra_metadata);
    }
  }
  model.set_layer_grads_ready_hook({});
  summary.interrupted = should_stop() && progress.step < cfg.max_iters;
  progress.wall_seconds += std::chrono::duration<double>(Clock::now() - run_start).count();
  if (!in.benchmark_only)
    save_checkpoint(ckpt, cfg, model, optimizers, layout, source, progress, in.extra_metadata);
  if (summary.interrupted)
    std::cout << "interrupted: checkpoint saved to " << ckpt << "; continue with --resume\n";

  // Per-rank optimizer figures (the point of sharding: each about 1/N of one process's).
  const double state_bytes = static_cast<double>(optimizers.state_bytes());
  const double step_ms = step_log.steps() > 0 ? 1e3 * optim_seconds / step_log.steps() : 0.0;
  const double sync_ms = step_log.steps() > 0 ? 1e3 * sync_seconds / step_log.steps() : 0.0;
  summary.optimizer_state_bytes = comm.allgather(state_bytes);
  summary.optimizer_step_ms = comm.allgather(step_ms);
  summary.optimizer_step_cpu_ms =
      comm.allgather(step_log.steps() > 0 ? 1e3 * optim_cpu_seconds / step_log.steps() : 0.0);
  summary.sync_ms = comm.allgather(sync_ms);
  const double drift =
      in.benchmark_only ? 0.0 : comm.allreduce_max(max_spectrum_drift(optimizers));
  for (int r = 0; r < world; ++r)
    std::cout << "rank " << r << ": optimizer state "
              << summary.optimizer_state_bytes[static_cast<std::size_t>(r)] / (1 << 20)
              << " MiB, optimizer step " << summary.optimizer_step_ms[static_cast<std::size_t>(r)]
              << " ms/step (CPU " << summary.optimizer_step_cpu_ms[static_cast<std::size_t>(r)]
              << " ms)" << (world > 1 ? ", communication " : "")
              << (world > 1
                      ? std::to_string(summary.sync_ms[static_cast<std::size_t>(r)]) + " ms/step"
                      : "")
              << "\n";

  if (root && !in.benchmark_only)
    write_json_file(cfg.out_dir + "/spectrum_final.json", spectra_json(params));
  summary.best_val_loss = progress.best_val_loss;
  summary.final_val_loss = progress.last_val_loss;
  summary.final_train_loss = last_loss;
  summary.iters = progress.step;
  summary.tokens_per_sec = step_log.tokens_per_sec();
  summary.wall_seconds = progress.wall_seconds;
  summary.spectrum_drift_max = drift;
  summary.skipped_steps = optimizers.skipped_steps();
  if (root) write_json_file(cfg.out_dir + "/summary.json", summary.to_json());
  return summary;
}

}  // namespace pion
