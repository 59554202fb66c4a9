// The CUDA back end of the training loop (include/pion/cuda/backend.h): CudaLlama and the
// CUDA optimizers, with the CPU model and OptimizerSet as the mirror that checkpoints are
// written from and read into.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <iostream>
#include <map>
#include <optional>

#include "pion/core/error.h"
#include "pion/core/linalg.h"
#include "pion/cuda/backend.h"
#include "pion/cuda/generate.h"
#include "pion/cuda/llama.h"
#include "pion/cuda/optim.h"
#include "pion/cuda/optim_like.h"
#include "pion/dist/communicator.h"
#include "pion/model/generate.h"
#include "pion/optim/pion.h"
#include "pion/train/build_optimizer.h"
#include "pion/train/checkpoint.h"

namespace pion::cuda {

namespace {

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
    mo.attention = choose_attention(cfg.attention, host.config(), cfg.batch_size, mo.matmul);
    mo.graphs = cfg.cuda_graphs;
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
        if (d.kind == "pion") {
          // The variant's moments (a one-sided run keeps one side's); sigma0 lives on the host.
          const Optimizer& cpu = *mirror_.optimizers()[d.optimizer];
          for (const StateSlot& slot : cpu.param_state_slots(p))
            if (slot.key != "sigma0")
              bytes += static_cast<std::size_t>(shape_numel(slot.shape)) * sizeof(float);
        } else if (d.kind == "muon")
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

// The optimizer step of every group, replayed from one CUDA graph after its first (eager) run
// (GraphReplayer). The learning rate and the gradient scale are written to the device before
// each step, outside the graph.
class StepLauncher {
 public:
  StepLauncher(Context& ctx, std::vector<DeviceGroup>& groups, bool use_graph)
      : ctx_(ctx), groups_(groups), steps_("the optimizer step", use_graph) {}

  void step(double factor, float grad_scale) {
    for (auto& d : groups_) d.device->set_lr(d.base_lr * factor);
    if (grad_scale != grad_scale_) {  // one launch per group saved on unclipped runs
      for (auto& d : groups_) d.device->set_grad_scale(grad_scale);
      grad_scale_ = grad_scale;
    }
    steps_.run(ctx_, 0.0, [this] {
      for (auto& d : groups_) d.device->queue_step();
    });
  }

 private:
  Context& ctx_;
  std::vector<DeviceGroup>& groups_;
  float grad_scale_ = 1.0f;  // what the optimizers hold (their initial value)
  GraphReplayer steps_;
};

using Clock = std::chrono::steady_clock;

class CudaBackend final : public TrainBackend {
 public:
  CudaBackend(const TrainConfig& cfg, Llama<float>& host_model)
      : cfg_(cfg), host_(host_model), params_(host_model.named_params()) {
    require_one_process();
    check(device_count() > 0,
          "--device cuda: no CUDA device is visible (cudaGetDeviceCount reports none); run on a "
          "machine with an NVIDIA GPU, or drop --device cuda to train on the CPU");
    mirror_ = build_optimizers(cfg_, params_);
  }

  const ModelConfig& model_config() const override { return host_.config(); }
  int local_rows(int global_rows) const override { return global_rows; }

  void load_weights(const TensorFile& file) override { host_.load_weights(file, "model."); }

  void load_checkpoint(const ResumePoint& point) override {
    host_.load_weights(point.file, "model.");
    mirror_.load_state(point.file);
    restore_rng(host_.dropout_rng(), point.dropout_rng);
  }

  void begin(bool benchmark_only) override {
    run_ = std::make_unique<DeviceRun>(ctx_, cfg_, host_, mirror_);
    run_->build_optimizers();
    if (!benchmark_only) run_->capture_sigma0();
    run_->upload_from_mirror();
    // run_training steps only after a finite grad_norm(), and the norm (squares of floats
    // summed in double: no overflow, NaN and Inf propagate) is finite exactly when every
    // gradient is; a clip scale in [0, 1] keeps them finite. So the optimizers' own NaN/Inf
    // check would read every gradient again to find nothing: off.
    for (auto& d : run_->groups()) d.device->set_finite_check(false);
    launcher_ = std::make_unique<StepLauncher>(ctx_, run_->groups(), cfg_.cuda_graphs);
    // Every write to the device weights is an optimizer step (reported in step()) or an
    // upload: the model's bf16 weight copy is refreshed once per step, not per micro-batch.
    run_->model().track_weight_changes(true);
    skipped_ = mirror_.skipped_steps();
    drift_at_evals_ = !benchmark_only && run_->pion_params() <= kDriftAtEvalMaxParams;
    CudaLlama& model = run_->model();
    std::cout << "device: " << device_description() << " | matmul " << cfg_.matmul_precision
              << " | attention " << attention_name(model.options().attention)
              << (cfg_.cuda_graphs ? "" : " | no CUDA graphs") << " | " << model.num_params()
              << " parameters on the device\n";
  }

  void set_lr_factor(double factor) override {
    factor_ = factor;
    mirror_.set_lr_factor(factor);  // the mirror's groups report the lr (and save it)
  }
  double lr() const override { return mirror_.optimizers().front()->groups().front().lr; }
  void zero_grad() override {
    grad_scale_ = 1.0f;
    run_->model().zero_grad();
  }

  double forward_backward(const MicroBatch& batch, double weight, bool /*last*/) override {
    CudaLlama& model = run_->model();
    if (batch.objective) return objective_forward_backward(batch, weight);
    model.forward_backward(batch.inputs, batch.targets, batch.rows, batch.seq, weight);
    return model.read_loss().loss;
  }

  // RL, as CpuBackend::objective_forward_backward: forward, the objective's weights from the
  // per-target log-probs (downloaded in double), backward of the weighted loss. The objective is
  // normalised over the batch already; one process, so its value is the step's share as is.
  double objective_forward_backward(const MicroBatch& batch, double weight) {
    CudaLlama& model = run_->model();
    model.forward_backward(batch.inputs, batch.targets, batch.rows, batch.seq, 0.0);
    const auto n = static_cast<std::size_t>(batch.rows) * static_cast<std::size_t>(batch.seq);
    log_probs_.resize(n);
    entropies_.resize(n);
    target_weights_.resize(n);
    model.target_log_probs(log_probs_, entropies_);
    const double loss = batch.objective(log_probs_, entropies_, target_weights_);
    model.weighted_backward(target_weights_, weight);
    return loss;
  }

  void finish_grads() override {}  // one process: nothing to reduce
  // Synchronises: the backward pass is done when it returns.
  double grad_norm() override {
    apply_grad_scale();
    return run_->model().grad_norm();
  }
  // The clip: the optimizers read each gradient times the factor (set_grad_scale), the same
  // bits as scaling the gradients first, without the pass over them. The factor must be in
  // [0, 1] (run_training's clip / norm is below 1, and may round to 0 in float): that keeps
  // finite gradients finite,
  // which turning the optimizers' check off relies on. A second factor before the step
  // pushes the first into the gradients through the model's pass.
  void scale_grads(float factor) override {
    check(
        factor >= 0.0f && factor <= 1.0f,
        "--device cuda: scale_grads takes a clip factor in [0, 1], got " + std::to_string(factor));
    apply_grad_scale();
    grad_scale_ = factor;
  }

  bool step() override {
    const auto t0 = Clock::now();
    launcher_->step(factor_, grad_scale_);
    grad_scale_ = 1.0f;
    run_->model().weights_changed();
    ctx_.synchronize();
    optimizer_seconds_ += std::chrono::duration<double>(Clock::now() - t0).count();
    return true;
  }

  void skip_step() override {  // weights and optimizer state untouched
    grad_scale_ = 1.0f;
    ++skipped_;
  }
  std::int64_t skipped_steps() const override { return skipped_; }

  double evaluate(const Evaluator& evaluator) override {
    CudaLlama& model = run_->model();
    const BatchLoss device_loss = [&model](std::span<const std::int32_t> x,
                                           std::span<const std::int32_t> y, int rows, int seq,
                                           std::int64_t& counted) {
      model.forward_backward(x, y, rows, seq, 0.0);
      const auto l = model.read_loss();
      counted = l.count;
      return l.loss;
    };
    return evaluator(device_loss);
  }

  // Sampling for RL: the KV-cached CUDA generator over the model's own device parameters (no
  // download; pion/cuda/generate.h), sampling on the host from its logits rows. Its decoder
  // converts weights for bf16 GEMMs itself, so it never reads a stale bf16 weight copy.
  PolicySampler policy_sampler() override {
    return [this](std::span<const std::vector<std::int32_t>> prompts,
                  const GenerateOptions& options, std::span<Rng> rngs) {
      return cuda::generate_tokens(run_->model(), prompts, options, rngs);
    };
  }

  // The reference policy on the device, with the training model's options (precision,
  // attention), so its log-probs are the bits the training forward gives the same weights. It
  // holds a gradient buffer it never uses (CudaLlama always has one): num_params floats.
  TargetScorer frozen_scorer(Llama<float>& frozen) override {
    auto model = std::make_shared<CudaLlama>(ctx_, frozen.config(), run_->model().options());
    model->upload_params(
        {frozen.params().data<float>(), static_cast<std::size_t>(frozen.params().numel())});
    return [model](std::span<const std::int32_t> inputs, std::span<const std::int32_t> targets,
                   int rows, int seq, std::span<double> log_probs) {
      model->forward_backward(inputs, targets, rows, seq, 0.0);
      model->target_log_probs(log_probs);
    };
  }

  void sync_host_weights() override { run_->download_weights(); }

  std::optional<double> spectrum_drift(bool at_eval) override {
    if (at_eval && !drift_at_evals_) return std::nullopt;
    run_->download_weights();
    return run_->max_drift();
  }

  nlohmann::json spectra() override {
    run_->download_weights();
    return spectra_json(params_);
  }

  // Also leaves the weights in the host model (the caller's, which holds the final weights
  // once the loop's last checkpoint is written).
  std::optional<TensorFile> checkpoint_tensors() override {
    run_->download_to_mirror(skipped_);
    TensorFile file;
    host_.save_weights(file, "model.");
    TensorFile state;
    mirror_.save_state(state);
    for (auto& [name, t] : state.tensors) file.tensors[name] = t;
    for (auto& [key, value] : state.metadata) file.metadata[key] = value;
    return file;
  }

  const Rng& dropout_rng() const override { return host_.dropout_rng(); }

  BackendCosts costs() const override {
    BackendCosts c;
    c.optimizer_state_bytes = static_cast<double>(run_->state_bytes());
    c.optimizer_seconds = optimizer_seconds_;
    return c;
  }

  void annotate_summary(nlohmann::json& summary) const override {
    summary["device"] = device_description();
    std::cout << "device: model " << run_->model().device_bytes() / double(1 << 30)
              << " GiB on the device\n";
  }

 private:
  // A scale_grads factor not yet handed to the optimizers, into the gradients themselves.
  void apply_grad_scale() {
    if (grad_scale_ != 1.0f) run_->model().scale_grads(grad_scale_);
    grad_scale_ = 1.0f;
  }

  // Drift at evals costs an fp64 SVD of every Pion matrix on the host; above this many Pion
  // parameters it is left to the end of the run.
  static constexpr std::int64_t kDriftAtEvalMaxParams = 20'000'000;

  Context ctx_;
  const TrainConfig cfg_;  // a copy: the caller's TrainInputs is moved into the loop
  Llama<float>& host_;
  std::vector<Param> params_;
  OptimizerSet mirror_;
  std::unique_ptr<DeviceRun> run_;
  std::unique_ptr<StepLauncher> launcher_;
  double factor_ = 1.0;
  float grad_scale_ = 1.0f;  // scale_grads' factor for the next step (1: none)
  std::int64_t skipped_ = 0;
  bool drift_at_evals_ = false;
  double optimizer_seconds_ = 0.0;
  // RL's per-micro-batch host arrays (reused).
  std::vector<double> log_probs_, entropies_, target_weights_;
};

}  // namespace

void require_one_process() {
  check(!dist::world().distributed(),
        "--device cuda trains in one process: data parallelism across GPUs (NCCL) is not "
        "built yet; run without mpirun, or with --device cpu under mpirun");
}

std::unique_ptr<TrainBackend> make_cuda_backend(const TrainConfig& config,
                                                Llama<float>& host_model) {
  return std::make_unique<CudaBackend>(config, host_model);
}

}  // namespace pion::cuda
