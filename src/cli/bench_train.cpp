// `pion bench train` (src/cli/bench_train.h). Each optimizer trains the preset model for
// warmup + steps steps on random tokens with the trainer the device names; tokens/s is
// taken over the timed steps only, from the per-step times in metrics.jsonl (the same
// steady-clock step times the trainer's progress lines use). The PyTorch peer is
// bench/torch_train_gpu.py (scripts/gpu-bench.sh runs both in one run).
#include "cli/bench_train.h"

#include <algorithm>
#include <chrono>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <sstream>

#include "cli/run_on_device.h"
#include "cli/validators.h"
#include "pion/core/error.h"
#include "pion/core/random.h"
#include "pion/train/checkpoint.h"
#include "pion/train/session.h"
#ifdef PION_HAVE_CUDA
#include "pion/cuda/runtime.h"
#endif

namespace pion::cli {

namespace {

// Uniform random tokens; targets are the next token of the same stream (nothing to learn
// beyond unigram statistics, which is fine for a speed measurement).
class RandomTokens : public BatchSource {
 public:
  RandomTokens(int batch, int seq, int vocab, std::uint64_t seed)
      : batch_(batch), seq_(seq), vocab_(vocab), rng_(seed) {}
  void next(std::vector<std::int32_t>& inputs, std::vector<std::int32_t>& targets) override {
    const std::size_t n = static_cast<std::size_t>(batch_) * seq_;
    inputs.resize(n);
    targets.resize(n);
    for (int b = 0; b < batch_; ++b) {
      std::int32_t prev = draw();
      for (int t = 0; t < seq_; ++t) {
        const std::int32_t next = draw();
        inputs[static_cast<std::size_t>(b) * seq_ + t] = prev;
        targets[static_cast<std::size_t>(b) * seq_ + t] = next;
        prev = next;
      }
    }
  }
  nlohmann::json state() const override { return rng_json(rng_); }
  void restore(const nlohmann::json& s) override { restore_rng(rng_, s); }

 private:
  std::int32_t draw() {
    return static_cast<std::int32_t>(rng_.below(static_cast<std::uint64_t>(vocab_)));
  }
  int batch_, seq_, vocab_;
  Rng rng_;
};

struct Preset {
  int n_layer, n_head, d_model, seq_len, batch, vocab;
};
Preset preset(const std::string& name) {
  // GPT-2 small's shape as a LLaMA (the model): 12 x (4 768x768, 2 2048x768, 1
  // 768x2048) hidden matrices, vocab 50304, seq 1024, batch 16.
  if (name == "gpt2-small") return {12, 12, 768, 1024, 16, 50304};
  // nanoGPT's baby shakespeare-char config (vocab 65).
  if (name == "baby") return {4, 4, 128, 64, 12, 65};
  throw Error("bench train: --preset must be gpt2-small or baby, got '" + name + "'");
}

std::vector<std::string> split(const std::string& list) {
  std::vector<std::string> out;
  std::stringstream in(list);
  std::string item;
  while (std::getline(in, item, ','))
    if (!item.empty()) out.push_back(item);
  return out;
}

struct Result {
  std::string optimizer;
  double tokens_per_sec = 0, median_step_ms = 0, optimizer_ms = 0, final_loss = 0;
};

Result bench_one(const BenchTrainArgs& a, const Preset& p, const std::string& optimizer,
                 const std::string& dir) {
  TrainConfig cfg;
  cfg.device = a.device;
  cfg.n_layer = a.layers > 0 ? a.layers : p.n_layer;
  cfg.n_head = p.n_head;
  cfg.d_model = p.d_model;
  cfg.seq_len = a.seq_len > 0 ? a.seq_len : p.seq_len;
  cfg.batch_size = a.batch > 0 ? a.batch : p.batch;
  cfg.optimizer = optimizer;
  cfg.init = optimizer == "pion" ? "spectral" : "normal";
  cfg.matrix_lr = optimizer == "pion" ? 0.005 : 0.02;
  cfg.max_iters = a.warmup + a.steps;
  cfg.warmup_iters = 2;
  cfg.eval_interval = 0;
  cfg.log_interval = std::max(1, cfg.max_iters / 4);
  cfg.attention = a.attention;
  cfg.matmul_precision = a.matmul_precision;
  cfg.pion_precision = a.pion_precision;
  cfg.cuda_graphs = a.cuda_graphs;
  cfg.out_dir = dir + "/" + optimizer;
  cfg.validate();

  Llama<float> model(model_config_for(cfg, p.vocab));
  Rng init(cfg.seed);
  model.init_weights(init);
  TrainInputs in;
  in.config = cfg;
  in.train_source = std::make_unique<RandomTokens>(cfg.batch_size, cfg.seq_len, p.vocab, 7);
  in.benchmark_only = true;
#ifdef PION_HAVE_CUDA
  if (a.profile_step > 0)
    in.on_step = [n = a.profile_step](int step, bool begin) {
      if (step != n) return;
      if (begin)
        cuda::profiler_start();
      else
        cuda::profiler_stop();
    };
#endif
  std::cout << "== " << optimizer << " (" << cfg.max_iters << " steps, first " << a.warmup
            << " untimed)\n";
  const TrainSummary s = run_training_on_device(std::move(in), model);

  Result r;
  r.optimizer = optimizer;
  r.final_loss = s.final_train_loss;
  r.optimizer_ms = s.optimizer_step_ms.empty() ? 0.0 : s.optimizer_step_ms.front();
  std::ifstream metrics(cfg.out_dir + "/metrics.jsonl");
  const double tokens = static_cast<double>(cfg.batch_size) * cfg.seq_len;
  std::vector<double> times;
  std::string line;
  while (std::getline(metrics, line)) {
    const auto rec = nlohmann::json::parse(line);
    if (rec.at("step").get<int>() > a.warmup)
      times.push_back(tokens / rec.at("tokens_per_sec").get<double>());
  }
  check(!times.empty(), "bench train: no timed steps were recorded");
  double total = 0.0;
  for (double t : times) total += t;
  r.tokens_per_sec = tokens * static_cast<double>(times.size()) / total;
  std::sort(times.begin(), times.end());
  r.median_step_ms = 1e3 * times[times.size() / 2];
  return r;
}

std::string today() {
  const std::time_t now = std::time(nullptr);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%d", std::gmtime(&now));
  return buf;
}

}  // namespace

void run_bench_train(const BenchTrainArgs& a) {
  check(a.steps > 0 && a.warmup >= 0, "bench train: --steps must be > 0 and --warmup >= 0");
  const Preset p = preset(a.preset);
  const auto optimizers = split(a.optimizers);
  check(!optimizers.empty(), "bench train: --optimizers names none (e.g. adamw,muon,pion)");
  check(a.profile_step <= a.warmup + a.steps,
        "bench train: --profile_step " + std::to_string(a.profile_step) +
            " is past the last step (--warmup + --steps = " + std::to_string(a.warmup + a.steps) +
            ")");
  check(a.profile_step == 0 || a.device == "cuda",
        "bench train: --profile_step brackets a step with the CUDA profiler API; it needs "
        "--device cuda");
  TrainConfig probe;
  probe.device = a.device;
  probe.validate();
  require_device(probe);
  std::string hardware = "CPU";
#ifdef PION_HAVE_CUDA
  if (a.device == "cuda") hardware = cuda::device_description();
#endif
  const std::string dir =
      (std::filesystem::temp_directory_path() /
       ("pion-bench-train-" +
        std::to_string(std::chrono::steady_clock::now().time_since_epoch().count())))
          .string();
  std::vector<Result> results;
  for (const auto& o : optimizers) results.push_back(bench_one(a, p, o, dir));
  std::filesystem::remove_all(dir);

  double adamw = 0.0;
  for (const auto& r : results)
    if (r.optimizer == "adamw") adamw = r.tokens_per_sec;
  std::ostringstream t;
  t << "\npion bench train | " << a.preset << " | device " << a.device << " (" << hardware << ")";
  if (a.device == "cuda")
    t << " | matmul " << a.matmul_precision << " | attention " << a.attention << " | pion "
      << a.pion_precision << (a.cuda_graphs ? "" : " | no CUDA graphs");
  t << " | " << today() << "\n\n"
    << "| optimizer | tokens/s | median step (ms) | optimizer step (ms) | vs adamw | final loss |\n"
    << "|---|---:|---:|---:|---:|---:|\n";
  nlohmann::json j = {{"device", a.device},
                      {"hardware", hardware},
                      {"preset", a.preset},
                      {"matmul_precision", a.matmul_precision},
                      {"attention", a.attention},
                      {"pion_precision", a.pion_precision},
                      {"cuda_graphs", a.cuda_graphs},
                      {"date", today()},
                      {"results", nlohmann::json::array()}};
  for (const auto& r : results) {
    t << "| " << r.optimizer << " | " << std::fixed << std::setprecision(0) << r.tokens_per_sec
      << " | " << std::setprecision(1) << r.median_step_ms << " | " << r.optimizer_ms << " | ";
    if (adamw > 0) t << std::setprecision(2) << r.tokens_per_sec / adamw << "x";
    t << " | " << std::setprecision(3) << r.final_loss << " |\n";
    j["results"].push_back({{"optimizer", r.optimizer},
                            {"tokens_per_sec", r.tokens_per_sec},
                            {"median_step_ms", r.median_step_ms},
                            {"optimizer_step_ms", r.optimizer_ms},
                            {"final_loss", r.final_loss}});
  }
  std::cout << t.str();
  if (!a.json.empty()) write_json_file(a.json, j);
}

void add_bench_train_command(CLI::App& bench) {
  auto args = std::make_shared<BenchTrainArgs>();
  auto* cmd = bench.add_subcommand(
      "train", "training tokens/s of each optimizer through the trainer, on random tokens");
  cmd->add_option("--device", args->device, "cpu | cuda")->capture_default_str();
  cmd->add_option("--preset", args->preset, "gpt2-small | baby")->capture_default_str();
  cmd->add_option("--optimizers", args->optimizers, "comma-separated: adamw,muon,pion")
      ->capture_default_str();
  cmd->add_option("--steps", args->steps, "timed steps per optimizer")
      ->check(FiniteRange(1, 100000))
      ->capture_default_str();
  cmd->add_option("--warmup", args->warmup, "untimed steps first")
      ->check(FiniteRange(0, 100000))
      ->capture_default_str();
  cmd->add_option("--batch", args->batch, "sequences per step (0 = the preset's)")
      ->check(FiniteRange(0, 1 << 16));
  cmd->add_option("--layers", args->layers, "transformer blocks (0 = the preset's)")
      ->check(FiniteRange(0, 1024));
  cmd->add_option("--seq_len", args->seq_len, "tokens per sequence (0 = the preset's)")
      ->check(FiniteRange(0, 1 << 20));
  cmd->add_option("--profile_step", args->profile_step,
                  "cuda: bracket this step (1-based, of each optimizer's run) with "
                  "cudaProfilerStart/Stop: the range nsys/ncu capture and the emulator's "
                  "EMU_COUNT window (0 = none)")
      ->check(FiniteRange(0, 200000));
  cmd->add_option("--attention", args->attention, "cuda: auto | flash | materialized | cudnn")
      ->capture_default_str();
  cmd->add_option("--matmul_precision", args->matmul_precision, "cuda: bf16 | tf32 | fp32")
      ->capture_default_str();
  cmd->add_option("--pion_precision", args->pion_precision, "cuda: fp32 | mixed")
      ->capture_default_str();
  cmd->add_option("--cuda_graphs", args->cuda_graphs,
                  "cuda: true | false (false: every kernel launched by the host, no CUDA graphs)")
      ->capture_default_str();
  cmd->add_option("--json", args->json, "also write the results to this JSON file");
  cmd->callback([args] { run_bench_train(*args); });
}

}  // namespace pion::cli
