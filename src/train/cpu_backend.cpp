#include "pion/train/cpu_backend.h"

#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <ctime>
#include <iostream>
#include <set>

#include "pion/core/error.h"
#include "pion/dist/communicator.h"
#include "pion/dist/shard.h"
#include "pion/model/decode.h"
#include "pion/model/generate.h"
#include "pion/model/memory.h"
#include "pion/train/build_optimizer.h"

namespace pion {

namespace {

// CPU seconds used by this process so far (all threads).
double process_cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
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

class CpuBackend final : public TrainBackend {
 public:
  CpuBackend(const TrainConfig& cfg, Llama<float>& model)
      : model_(model),
        comm_(dist::world()),
        params_(model.named_params()),
        local_rows_(cfg.batch_size / comm_.size()) {
    const int world = comm_.size();
    if (cfg.threads > 0) {
      omp_set_num_threads(cfg.threads);
      openblas_set_num_threads(cfg.threads);
    }
    // Sharded optimizer (dist/shard.h): the whole set only names the parameters (its state is
    // created lazily, so it costs nothing); this rank steps the ones the plan gives it.
    const OptimizerSet full_set = build_optimizers(cfg, params_);
    layout_ = dist::layout_of(full_set);
    plan_ = dist::plan_ownership(full_set, world);
    for (const auto& [name, r] : plan_.owner)
      if (r == comm_.rank()) owned_.insert(name);
    optimizers_ =
        build_optimizers(cfg, params_, [&](const Param& p) { return owned_.count(p.name) > 0; });
    // Refuses a batch that cannot fit, with this rank's optimizer state as its optimizers will
    // keep it (Pion's depends on the variant and the shapes), before the first forward() or
    // step() allocates anything.
    check_training_memory(model.config(), cfg.batch_size / world, cfg.seq_len,
                          optimizers_.planned_state_bytes(), "pion train");
    for (auto& p : params_)
      if (auto it = plan_.owner.find(p.name); it != plan_.owner.end())
        weight_ranges_.push_back(
            {{p.value.data<float>(), static_cast<std::size_t>(p.value.numel())}, it->second});
  }

  ~CpuBackend() override { model_.set_layer_grads_ready_hook({}); }

  const ModelConfig& model_config() const override { return model_.config(); }
  int local_rows(int global_rows) const override { return global_rows / comm_.size(); }

  void load_weights(const TensorFile& file) override { model_.load_weights(file, "model."); }

  void load_checkpoint(const ResumePoint& point) override {
    model_.load_weights(point.file, "model.");
    // The file holds every parameter's state whatever N it was saved with; keep ours.
    optimizers_.load_state(comm_.size() > 1
                               ? dist::shard_optimizer_state(point.file, layout_, owned_)
                               : point.file);
    restore_rng(model_.dropout_rng(), point.dropout_rng);
  }

  void begin(bool /*benchmark_only*/) override {
    const int world = comm_.size(), rank = comm_.rank();
    if (rank > 0) {
      // Dropout masks must differ between ranks (their rows differ). Derived from rank 0's
      // stream, so a run is reproducible for a given N; with dropout on, runs with different N
      // (or resumed with another N) draw different masks.
      auto s = model_.dropout_rng().state();
      model_.dropout_rng() =
          Rng(s[0] ^ (0x9e3779b97f4a7c15ULL * static_cast<std::uint64_t>(rank)));
    }
    if (world > 1) buckets_ = layer_buckets(model_);
    if (world > 1) {
      std::string loads;
      for (double l : plan_.load)
        loads +=
            (loads.empty() ? "" : " / ") + std::to_string(static_cast<long long>(l / 1e6)) + "M";
      std::cout << "data parallel: " << world << " ranks, " << local_rows_
                << " rows each; gradients "
                << (buckets_.empty() ? std::string("all-reduced after backward")
                                     : "all-reduced in " + std::to_string(buckets_.size() + 1) +
                                           " buckets, one per layer started during backward")
                << "; optimizer work sharded by cost (rank loads " << loads << ")\n";
    }
    model_.set_training(true);
  }

  void set_lr_factor(double factor) override { optimizers_.set_lr_factor(factor); }
  double lr() const override { return optimizers_.optimizers().front()->groups().front().lr; }
  void zero_grad() override { model_.zero_grad(); }

  double forward_backward(const MicroBatch& batch, double weight, bool last) override {
    if (batch.objective) return objective_forward_backward(batch, weight, last);
    const double local_loss = model_.forward(batch.inputs, batch.targets, batch.rows, batch.seq);
    // The loss is the mean over the GLOBAL micro-batch: weight this rank's mean by its share
    // of the counted targets (exactly 1/N when every target counts, as in pretraining), so
    // the summed gradients are the global mean's, as in one process.
    double share = 1.0;
    if (comm_.distributed()) {
      const double local_count = static_cast<double>(model_.target_count());
      const double global_count = comm_.allreduce_sum(local_count);
      share = global_count > 0 ? local_count / global_count : 0.0;
    }
    const double loss = comm_.allreduce_sum(local_loss * share);
    // Reduce during backward only on the last micro-batch: earlier ones still accumulate.
    const bool overlap = !buckets_.empty() && last;
    model_.set_layer_grads_ready_hook(
        overlap ? std::function<void(int)>([this](int layer) { start_layer_bucket(layer); })
                : std::function<void(int)>());
    model_.backward(share * weight);
    return loss;
  }

  // RL: forward, the objective's weights from the per-target log-probs, backward of the
  // weighted loss. The objective is normalised over the global batch already (no share).
  double objective_forward_backward(const MicroBatch& batch, double weight, bool last) {
    model_.forward(batch.inputs, batch.targets, batch.rows, batch.seq);
    const auto n = static_cast<std::size_t>(batch.rows) * static_cast<std::size_t>(batch.seq);
    log_probs_.resize(n);
    entropies_.resize(n);
    target_weights_.resize(n);
    model_.target_log_probs(log_probs_, entropies_);
    const double local = batch.objective(log_probs_, entropies_, target_weights_);
    model_.set_target_weights(target_weights_);
    const double loss = comm_.allreduce_sum(local);
    const bool overlap = !buckets_.empty() && last;
    model_.set_layer_grads_ready_hook(
        overlap ? std::function<void(int)>([this](int layer) { start_layer_bucket(layer); })
                : std::function<void(int)>());
    model_.backward(weight);
    return loss;
  }

  // Gradient all-reduce in buckets: each layer's range started reducing (MPI_Iallreduce) as
  // soon as backward finished that layer, during the last micro-batch; the rest (embedding,
  // final norm, LM head) starts now, and all are waited on here. Local gradients were
  // pre-scaled by the rank's share, so the sum is the mean.
  void finish_grads() override {
    if (!comm_.distributed()) return;
    const auto t0 = Clock::now();
    float* grad = model_.grads().data<float>();
    const std::int64_t total = model_.grads().numel();
    if (buckets_.empty()) {
      comm_.allreduce_sum(std::span<float>(grad, static_cast<std::size_t>(total)));
    } else {
      std::int64_t lo = total, hi = 0;
      for (const auto& b : buckets_) {
        lo = std::min(lo, b.offset);
        hi = std::max(hi, b.offset + b.count);
      }
      comm_.start_allreduce_sum({grad, static_cast<std::size_t>(lo)});
      comm_.start_allreduce_sum({grad + hi, static_cast<std::size_t>(total - hi)});
      comm_.wait_all();
    }
    costs_.sync_seconds += seconds_since(t0);
  }

  double grad_norm() override {
    const float* g = model_.grads().data<float>();
    const std::int64_t n = model_.grads().numel();
    double sum = 0.0;
#pragma omp parallel for reduction(+ : sum) schedule(static)
    for (std::int64_t i = 0; i < n; ++i) sum += static_cast<double>(g[i]) * g[i];
    return std::sqrt(sum);
  }

  void scale_grads(float factor) override {
    float* p = model_.grads().data<float>();
    const std::int64_t n = model_.grads().numel();
#pragma omp parallel for schedule(static)
    for (std::int64_t i = 0; i < n; ++i) p[i] *= factor;
  }

  bool step() override {
    const auto t0 = Clock::now();
    const double cpu0 = process_cpu_seconds();
    const bool applied = optimizers_.step();
    count_optimizer_time(t0, cpu0);
    if (applied && comm_.distributed()) {
      // All-gather of the updated weights: each parameter from its owner.
      const auto t1 = Clock::now();
      for (auto& r : weight_ranges_) comm_.start_broadcast(r.values, r.owner);
      comm_.wait_all();
      costs_.sync_seconds += seconds_since(t1);
    }
    return applied;
  }

  void skip_step() override {
    const auto t0 = Clock::now();
    const double cpu0 = process_cpu_seconds();
    optimizers_.skip_step();
    count_optimizer_time(t0, cpu0);
  }

  std::int64_t skipped_steps() const override { return optimizers_.skipped_steps(); }

  double evaluate(const Evaluator& evaluator) override {
    model_.set_training(false);
    const double val = evaluator(cpu_batch_loss(model_));
    model_.set_training(true);
    return val;
  }

  std::optional<double> spectrum_drift(bool /*at_eval*/) override {
    return comm_.allreduce_max(max_spectrum_drift(optimizers_));
  }

  PolicySampler policy_sampler() override {
    return
        [this](std::span<const std::vector<std::int32_t>> prompts, const GenerateOptions& options,
               std::span<Rng> rngs) { return generate_tokens(model_, prompts, options, rngs); };
  }
  TargetScorer frozen_scorer(Llama<float>& frozen) override {
    // The inference decoder over each row up to its last target: no activations kept and no
    // padding, the training forward's values up to float rounding.
    return [&frozen](std::span<const std::int32_t> inputs, std::span<const std::int32_t> targets,
                     int rows, int seq, std::span<double> log_probs) {
      score_targets(frozen, inputs, targets, rows, seq, log_probs);
    };
  }
  void sync_host_weights() override {}  // model_ is the host model

  nlohmann::json spectra() override { return spectra_json(params_); }

  std::optional<TensorFile> checkpoint_tensors() override {
    TensorFile state;
    optimizers_.save_state(state);
    if (comm_.distributed()) {
      std::vector<std::string> packed = comm_.gather(dist::pack(state), 0);
      if (!comm_.is_root()) return std::nullopt;
      std::vector<TensorFile> shards;
      for (const auto& bytes : packed) shards.push_back(dist::unpack(bytes));
      state = dist::merge_optimizer_states(shards, layout_);
    }
    TensorFile file;
    model_.save_weights(file, "model.");
    for (auto& [name, t] : state.tensors) file.tensors[name] = t;
    for (auto& [key, value] : state.metadata) file.metadata[key] = value;
    return file;
  }

  const Rng& dropout_rng() const override { return model_.dropout_rng(); }

  BackendCosts costs() const override {
    BackendCosts c = costs_;
    c.optimizer_state_bytes = static_cast<double>(optimizers_.state_bytes());
    return c;
  }

  void annotate_summary(nlohmann::json& /*summary*/) const override {}

 private:
  // CPU time as well as wall time: on a shared machine, ranks that compete for cores see wall
  // times inflated by time-slicing, while CPU time measures the work each rank does (what
  // sharding divides).
  void count_optimizer_time(Clock::time_point t0, double cpu0) {
    costs_.optimizer_cpu_seconds += process_cpu_seconds() - cpu0;
    costs_.optimizer_seconds += seconds_since(t0);
  }

  void start_layer_bucket(int layer) {
    const Bucket& b = buckets_[static_cast<std::size_t>(layer)];
    comm_.start_allreduce_sum(
        {model_.grads().data<float>() + b.offset, static_cast<std::size_t>(b.count)});
    // MPI progresses non-blocking collectives only inside MPI calls: poke it per layer.
    comm_.progress();
  }

  struct OwnedRange {  // a parameter's weights and the rank that steps them
    std::span<float> values;
    int owner;
  };

  Llama<float>& model_;
  dist::Communicator& comm_;
  std::vector<Param> params_;
  int local_rows_;
  dist::OptimizerLayout layout_;
  dist::OwnershipPlan plan_;
  std::set<std::string> owned_;
  OptimizerSet optimizers_;
  std::vector<OwnedRange> weight_ranges_;
  std::vector<Bucket> buckets_;
  BackendCosts costs_;
  std::vector<double> log_probs_, entropies_, target_weights_;  // RL objective scratch
};

}  // namespace

BatchLoss cpu_batch_loss(Llama<float>& model) {
  return [&model](std::span<const std::int32_t> inputs, std::span<const std::int32_t> targets,
                  int rows, int seq, std::int64_t& counted) {
    const double loss = model.forward(inputs, targets, rows, seq);
    counted = model.target_count();
    return loss;
  };
}

std::unique_ptr<TrainBackend> make_cpu_backend(const TrainConfig& config, Llama<float>& model) {
  return std::make_unique<CpuBackend>(config, model);
}

}  // namespace pion
