// `pion train --device cuda` end to end through the binary. Everywhere: the error a user gets
// without the CUDA back end or without a GPU (one line, exit 2, nothing half-written). On a
// GPU (scripts/gpu-check.sh): the GPU run follows the CPU run of the same config (fp32
// GEMMs, materialised attention) step by step in loss; a GPU checkpoint resumes on the CPU
// and a CPU checkpoint on the GPU (same names and format), and resuming on the GPU is exact;
// SIGTERM and periodic (checkpoint_minutes) checkpoints work in the GPU loop as on the CPU;
// `pion sample` and `pion eval`'s exact-match answers on the GPU give the CPU's text.
// `pion rl --device cuda` (issue 13): a few GRPO steps sample the same completions (rewards,
// lengths) and end at the same weights as the CPU run, with and without the KL term and PPO
// epochs; a GPU rl run stopped between two PPO epochs resumes bit-exactly; without a GPU, rl
// --device cuda is refused like train.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "compare.h"
#include "helpers.h"
#include "pion/core/safetensors.h"
#include "pion/train/config.h"

using namespace pion;
namespace fs = std::filesystem;

namespace {

std::string corpus(const std::string& dir) {
  std::string text;
  for (int i = 0; i < 4000; ++i)
    text += "line " + std::to_string(i * 37 % 1000) + " of the corpus, word " +
            std::to_string(i % 91) + ".\n";
  const std::string path = dir + "/corpus.txt";
  std::ofstream(path) << text;
  return path;
}

std::string flags(const std::string& data, const std::string& out, const std::string& opt,
                  const std::string& device) {
  return "--data " + data + " --out_dir " + out + " --optimizer " + opt + " --device " + device +
         " --n_layer 2 --n_head 2 --d_model 32 --seq_len 32 --batch_size 4 --max_iters 20"
         " --warmup_iters 3 --eval_interval 10 --eval_iters 2 --log_interval 5 --threads 1"
         " --matrix_lr 0.01 --lr 0.003 --init spectral --matmul_precision fp32"
         " --attention materialized --muon_precision fp32";
}

std::vector<double> train_losses(const std::string& run_dir) {
  std::vector<double> out;
  std::ifstream in(run_dir + "/metrics.jsonl");
  std::string line;
  while (std::getline(in, line)) out.push_back(nlohmann::json::parse(line).at("train_loss"));
  return out;
}

bool has_gpu() { return test::cuda_device_present(); }

#define PION_REQUIRE_GPU_RUN()                                               \
  if (!has_gpu())                                                            \
  GTEST_SKIP() << "no CUDA device (or no CUDA back end in this build): run " \
                  "scripts/gpu-check.sh on a machine with an NVIDIA GPU"

}  // namespace

TEST(CudaTrain, ClearErrorWithoutGpu) {
  if (has_gpu()) GTEST_SKIP() << "this machine has a GPU: the error path is not reachable";
  const std::string dir = test::temp_dir("cuda-train-nogpu");
  auto r = test::run_pion("train " + flags(corpus(dir), dir + "/run", "adamw", "cuda"));
  EXPECT_EQ(r.exit_code, 2) << r.output;
#ifdef PION_HAVE_CUDA
  EXPECT_NE(r.output.find("no CUDA device is visible"), std::string::npos) << r.output;
#else
  EXPECT_NE(r.output.find("built without the CUDA back end"), std::string::npos) << r.output;
#endif
  EXPECT_NE(r.output.find("--device cpu"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(dir + "/run/checkpoint.safetensors"));
  auto cpu_run = test::run_pion("train " + flags(corpus(dir), dir + "/cpu", "adamw", "cpu") +
                                " --max_iters 2");
  ASSERT_EQ(cpu_run.exit_code, 0) << cpu_run.output;
  auto eval =
      test::run_pion("eval --checkpoint " + dir + "/cpu/checkpoint.safetensors --device cuda");
  EXPECT_EQ(eval.exit_code, 2) << eval.output;
  EXPECT_NE(eval.output.find("--device cpu"), std::string::npos) << eval.output;
  // Generation on the GPU (`pion sample`, the exact-match answers of `pion eval`): the same.
  for (const std::string cmd : {"sample --tokens 4 --device cuda --checkpoint ",
                                "eval --tasks /nonexistent.jsonl "
                                "--device cuda --checkpoint "}) {
    auto gen = test::run_pion(cmd + dir + "/cpu/checkpoint.safetensors");
    EXPECT_EQ(gen.exit_code, 2) << cmd << gen.output;
    EXPECT_TRUE(test::single_error_line(gen.output)) << cmd << gen.output;
    EXPECT_NE(gen.output.find("--device cpu"), std::string::npos) << cmd << gen.output;
  }
  auto tpu =
      test::run_pion("sample --device tpu --checkpoint " + dir + "/cpu/checkpoint.safetensors");
  EXPECT_EQ(tpu.exit_code, 2) << tpu.output;
  EXPECT_NE(tpu.output.find("--device must be cpu or cuda"), std::string::npos) << tpu.output;
  auto bad = test::run_pion("train " + flags(corpus(dir), dir + "/run", "adamw", "tpu"));
  EXPECT_EQ(bad.exit_code, 2);
  EXPECT_NE(bad.output.find("'device' must be cpu or cuda"), std::string::npos) << bad.output;
  // pion rl refuses the same way, before it writes anything into its out_dir.
  auto tasks = test::run_pion(
      "make-task arithmetic --n 20 --max_digits 1 --answer_key answer "
      "--out " +
      dir + "/tasks.jsonl");
  ASSERT_EQ(tasks.exit_code, 0) << tasks.output;
  auto rl = test::run_pion("rl --from " + dir + "/cpu/checkpoint.safetensors --tasks " + dir +
                           "/tasks.jsonl --out_dir " + dir + "/rl --max_iters 1 --device cuda");
  EXPECT_EQ(rl.exit_code, 2) << rl.output;
#ifdef PION_HAVE_CUDA
  EXPECT_NE(rl.output.find("no CUDA device is visible"), std::string::npos) << rl.output;
#else
  EXPECT_NE(rl.output.find("built without the CUDA back end"), std::string::npos) << rl.output;
#endif
  EXPECT_NE(rl.output.find("--device cpu"), std::string::npos) << rl.output;
  EXPECT_FALSE(fs::exists(dir + "/rl")) << "nothing is written before the device is refused";
}

// One run of the parity test: the optimizer and extra train flags. "pion-variant" is issue
// 11's GPU side end to end: a norm-free model with transported momentum and alternating sides
// (its state slots m, v must survive the checkpoint moves below). "gqa-tied" is issue 14's:
// one K/V head and the LM head tied to the embedding (one AdamW parameter beside Muon).
struct ParityCase {
  std::string name, optimizer, extra;
};
void PrintTo(const ParityCase& c, std::ostream* os) { *os << c.name; }

class CudaTrainParity : public ::testing::TestWithParam<ParityCase> {};

TEST_P(CudaTrainParity, FollowsCpuRunAndCheckpointsMoveBetweenDevices) {
  PION_REQUIRE_GPU_RUN();
  const ParityCase& c = GetParam();
  const std::string opt = c.name;
  const std::string dir = test::temp_dir("cuda-train-" + opt);
  const std::string data = corpus(dir);
  const auto flags = [&](const std::string& d, const std::string& out, const std::string&,
                         const std::string& device) {
    return ::flags(d, out, c.optimizer, device) + c.extra;
  };
  auto cpu = test::run_pion("train " + flags(data, dir + "/cpu", opt, "cpu"));
  ASSERT_EQ(cpu.exit_code, 0) << cpu.output;
  auto gpu = test::run_pion("train " + flags(data, dir + "/gpu", opt, "cuda"));
  ASSERT_EQ(gpu.exit_code, 0) << gpu.output;
  const auto a = train_losses(dir + "/cpu"), b = train_losses(dir + "/gpu");
  ASSERT_EQ(a.size(), b.size());
  double worst = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) worst = std::max(worst, std::abs(a[i] - b[i]));
  std::printf("%s: 20 steps, worst |loss_cpu - loss_gpu| = %.2e (final %.4f vs %.4f)\n",
              opt.c_str(), worst, a.back(), b.back());
  EXPECT_LT(worst, 5e-3) << opt;

  // The validation loss of the CPU checkpoint on both devices.
  const std::string ckpt = dir + "/cpu/checkpoint.safetensors";
  auto eval_cpu = test::run_pion("eval --checkpoint " + ckpt + " --batches 4");
  auto eval_gpu = test::run_pion("eval --checkpoint " + ckpt + " --batches 4 --device cuda");
  ASSERT_EQ(eval_cpu.exit_code, 0) << eval_cpu.output;
  ASSERT_EQ(eval_gpu.exit_code, 0) << eval_gpu.output;
  auto last_json = [](const std::string& out) {
    const auto at = out.rfind("{\"");
    return nlohmann::json::parse(out.substr(at));
  };
  const double val_cpu = last_json(eval_cpu.output).at("val_loss");
  const double val_gpu = last_json(eval_gpu.output).at("val_loss");
  EXPECT_NEAR(val_cpu, val_gpu, 1e-4 * val_cpu) << opt;

  // Same names and shapes in both checkpoints.
  TensorFile ca = load_safetensors(dir + "/cpu/checkpoint.safetensors");
  TensorFile cb = load_safetensors(dir + "/gpu/checkpoint.safetensors");
  ASSERT_EQ(ca.tensors.size(), cb.tensors.size());
  for (const auto& [name, t] : ca.tensors) {
    ASSERT_TRUE(cb.tensors.count(name)) << name << " missing from the GPU checkpoint";
    EXPECT_EQ(t.shape(), cb.tensors.at(name).shape()) << name;
  }

  // GPU checkpoint -> CPU, CPU checkpoint -> GPU: both continue to 30 steps.
  fs::copy(dir + "/gpu", dir + "/gpu-to-cpu", fs::copy_options::recursive);
  fs::copy(dir + "/cpu", dir + "/cpu-to-gpu", fs::copy_options::recursive);
  auto r1 = test::run_pion("train " + flags(data, dir + "/gpu-to-cpu", opt, "cpu") +
                           " --max_iters 30 --resume");
  ASSERT_EQ(r1.exit_code, 0) << r1.output;
  auto r2 = test::run_pion("train " + flags(data, dir + "/cpu-to-gpu", opt, "cuda") +
                           " --max_iters 30 --resume");
  ASSERT_EQ(r2.exit_code, 0) << r2.output;
  EXPECT_EQ(train_losses(dir + "/gpu-to-cpu").size(), 30u);
  EXPECT_EQ(train_losses(dir + "/cpu-to-gpu").size(), 30u);
}

INSTANTIATE_TEST_SUITE_P(
    Optimizers, CudaTrainParity,
    ::testing::Values(ParityCase{"adamw", "adamw", ""}, ParityCase{"muon", "muon", ""},
                      ParityCase{"pion", "pion", ""},
                      ParityCase{"pion-variant", "pion",
                                 " --norm none --pion_momentum transported"
                                 " --pion_update_side alternate"},
                      ParityCase{"gqa-tied", "muon", " --n_kv_head 1 --tie_embeddings true"}),
    [](const ::testing::TestParamInfo<ParityCase>& info) {
      std::string n = info.param.name;
      for (char& ch : n)
        if (ch == '-') ch = '_';
      return n;
    });

// `pion sample --device cuda` and `pion eval --tasks --device cuda` decode on the GPU
// (pion/cuda/generate.h) with the checkpoint's fp32 GEMMs: the same greedy texts, the same
// seeded samples and the same exact-match answers as on the CPU (sampling stays on the host).
TEST(CudaTrain, SampleAndExactMatchOnGpuEqualCpu) {
  PION_REQUIRE_GPU_RUN();
  const std::string dir = test::temp_dir("cuda-generate-cli");
  auto train = test::run_pion("train " + flags(corpus(dir), dir + "/cpu", "adamw", "cpu"));
  ASSERT_EQ(train.exit_code, 0) << train.output;
  const std::string ckpt = " --checkpoint " + dir + "/cpu/checkpoint.safetensors";
  const std::string tasks = dir + "/tasks.jsonl";
  std::ofstream(tasks) << "{\"prompt\": \"line 37 of\", \"response\": \" the corpus\"}\n"
                          "{\"prompt\": \"word 1\", \"response\": \"2.\"}\n"
                          "{\"prompt\": \"line 74\", \"response\": \" of the corpus, word\"}\n";
  for (const std::string& args : std::vector<std::string>{
           "sample --prompt 'line 3' --temperature 0 --tokens 40 --samples 3",
           "sample --prompt 'line' --temperature 0.8 --top_k 5 --tokens 30 --samples 2 --seed 3",
           "eval --tasks " + tasks}) {
    auto cpu = test::run_pion(args + ckpt + " --device cpu");
    auto gpu = test::run_pion(args + ckpt + " --device cuda");
    ASSERT_EQ(cpu.exit_code, 0) << args << cpu.output;
    ASSERT_EQ(gpu.exit_code, 0) << args << gpu.output;
    EXPECT_EQ(gpu.output, cpu.output) << args;
  }
}

TEST(CudaTrain, ResumeOnGpuIsExact) {
  PION_REQUIRE_GPU_RUN();
  const std::string dir = test::temp_dir("cuda-resume");
  const std::string data = corpus(dir);
  auto straight = test::run_pion("train " + flags(data, dir + "/a", "pion", "cuda"));
  ASSERT_EQ(straight.exit_code, 0) << straight.output;
  auto first =
      test::run_pion("train " + flags(data, dir + "/b", "pion", "cuda") + " --stop_after 8");
  ASSERT_EQ(first.exit_code, 0) << first.output;
  auto second = test::run_pion("train " + flags(data, dir + "/b", "pion", "cuda") + " --resume");
  ASSERT_EQ(second.exit_code, 0) << second.output;
  TensorFile a = load_safetensors(dir + "/a/checkpoint.safetensors");
  TensorFile b = load_safetensors(dir + "/b/checkpoint.safetensors");
  for (const auto& [name, t] : a.tensors) {
    ASSERT_TRUE(b.tensors.count(name)) << name;
    EXPECT_EQ(0, std::memcmp(t.raw(), b.tensors.at(name).raw(), t.nbytes()))
        << name << " differs after a GPU resume";
  }
}

// The GPU loop handles SIGTERM like the CPU one, saves periodic checkpoints by wall time (here
// after every step: the final save then finds the step saved already), and --resume keeps
// metrics.jsonl free of duplicate steps.
TEST(CudaTrain, SigtermAndPeriodicCheckpointsOnGpu) {
  PION_REQUIRE_GPU_RUN();
  const std::string dir = test::temp_dir("cuda-sigterm");
  const std::string data = corpus(dir);
  const std::string out = dir + "/run";
  const std::string run_flags =
      flags(data, out, "adamw", "cuda") + " --max_iters 100000 --checkpoint_minutes 0.0001";
  auto r = test::run_command("(" + std::string(PION_BINARY) + " train " + run_flags + " > " + dir +
                             "/log.txt 2>&1 & pid=$!; for i in $(seq 1200); do [ $(cat " + out +
                             "/metrics.jsonl 2>/dev/null | wc -l) -ge 3 ] && break; sleep 0.1; "
                             "done; kill -TERM $pid; wait $pid; echo rc=$?)");
  const std::string log = test::run_command("cat " + dir + "/log.txt").output;
  ASSERT_NE(r.output.find("rc=0"), std::string::npos) << r.output << log;
  EXPECT_NE(log.find("interrupted by SIGTERM"), std::string::npos) << log;
  const int stopped = read_json_file(out + "/summary.json")["iters"].get<int>();
  TensorFile ckpt = load_safetensors(out + "/checkpoint.safetensors");
  EXPECT_EQ(nlohmann::json::parse(ckpt.metadata.at("pion.train"))["step"].get<int>(), stopped);
  auto resumed = test::run_pion("train " + run_flags + " --resume --stop_after " +
                                std::to_string(stopped + 2));
  ASSERT_EQ(resumed.exit_code, 0) << resumed.output;
  std::ifstream in(out + "/metrics.jsonl");
  std::string line;
  int expected = 1;
  while (std::getline(in, line))
    EXPECT_EQ(nlohmann::json::parse(line).at("step").get<int>(), expected++) << line;
  EXPECT_EQ(expected, stopped + 3);
}

// ---- pion rl --device cuda --------------------------------------------------------------------

namespace {

// A tiny model that sometimes answers: a base (char tokenizer over the built-in corpus, 1
// layer, d_model 32, seq_len 24, 3 steps) finetuned 150 steps on one-digit additions on the
// CPU (about 10% held-out exact match), so sampled groups have mixed rewards from the first
// steps on and GRPO has a gradient (with all rewards equal, adaptive optimizers would turn
// rounding noise into full-size updates and a comparison would mean nothing). Once per process.
struct RlFixture {
  std::string dir, ckpt, tasks;
};
const RlFixture& rl_fixture() {
  static const RlFixture f = [] {
    RlFixture x;
    x.dir = test::temp_dir("cuda-rl");
    auto r = test::run_pion(
        "train --data fortunes --n_layer 1 --n_head 2 --d_model 32 "
        "--seq_len 24 --batch_size 4 --max_iters 3 --eval_interval 0 "
        "--threads 1 --out_dir " +
        x.dir + "/base");
    EXPECT_EQ(r.exit_code, 0) << r.output;
    r = test::run_pion(
        "make-task arithmetic --n 200 --max_digits 1 --answer_key response "
        "--out " +
        x.dir + "/ft.jsonl");
    EXPECT_EQ(r.exit_code, 0) << r.output;
    r = test::run_pion("finetune --from " + x.dir + "/base/checkpoint.safetensors --tasks " +
                       x.dir + "/ft.jsonl --out_dir " + x.dir +
                       "/ft --max_iters 150 "
                       "--batch_size 8 --lr 0.01 --threads 1 --eval_interval 0");
    EXPECT_EQ(r.exit_code, 0) << r.output;
    x.ckpt = x.dir + "/ft/checkpoint.safetensors";
    x.tasks = x.dir + "/tasks.jsonl";
    r = test::run_pion("make-task arithmetic --n 40 --max_digits 1 --answer_key answer --out " +
                       x.tasks);
    EXPECT_EQ(r.exit_code, 0) << r.output;
    return x;
  }();
  return f;
}

// P = 2 prompts x G = 3 completions of up to 4 tokens per sampled batch, the GPU's arithmetic
// as close to the CPU's as it goes (fp32 GEMMs, materialised attention).
std::string rl_flags(const std::string& out, const std::string& device) {
  const RlFixture& f = rl_fixture();
  return "rl --from " + f.ckpt + " --tasks " + f.tasks + " --out_dir " + out + " --device " +
         device +
         " --rl_prompts_per_step 2 --rl_group_size 3 --rl_max_new_tokens 4 --lr 0.01"
         " --eval_interval 2 --eval_iters 2 --log_interval 1 --threads 1 --eval_examples 3"
         " --matmul_precision fp32 --attention materialized --muon_precision fp32";
}

std::vector<nlohmann::json> rl_metrics(const std::string& run_dir) {
  std::vector<nlohmann::json> out;
  std::ifstream in(run_dir + "/metrics.jsonl");
  std::string line;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line);
    j.erase("elapsed_seconds");  // wall time differs between runs
    j.erase("tokens_per_sec");
    out.push_back(j);
  }
  return out;
}

struct RlCase {
  std::string name, extra;
};
void PrintTo(const RlCase& c, std::ostream* os) {
  *os << c.name;
}

}  // namespace

class CudaRlParity : public ::testing::TestWithParam<RlCase> {};

// The GPU run against the CPU run of the same config. Sampling happens on the device from its
// current weights (CudaBackend::policy_sampler, cuda::generate_tokens), with the same
// per-completion RNG streams, so the sampled tokens are the same as long as the two devices'
// weights are close enough that no sampled token sits on a CDF boundary (~1e-6 wide here): for
// these few steps the rewards, completion lengths and greedy exact matches must be EQUAL, not near.
// The rest differs by fp32 summation order (GEMMs, reductions) only: per step the GRPO loss and the
// entropy to 1e-4, the KL to 1e-5 + 1e-3 |KL| (the first step's 0 on both: the policy is
// its own reference until it takes a step), and the final weights to 1e-4 relative
// (Frobenius, per tensor). On the emulator (2026-12-02): loss 2e-7, entropy 9e-6, KL 1.8e-6
// (of ~1e-2), weights 1e-5 (muon + KL + 2 PPO epochs, 6 steps; adamw without KL: 1.4e-6).
TEST_P(CudaRlParity, FollowsCpuRun) {
  PION_REQUIRE_GPU_RUN();
  const RlCase& c = GetParam();
  const std::string dir = rl_fixture().dir + "/" + c.name;
  auto cpu = test::run_pion(rl_flags(dir + "/cpu", "cpu") + c.extra);
  ASSERT_EQ(cpu.exit_code, 0) << cpu.output;
  auto gpu = test::run_pion(rl_flags(dir + "/gpu", "cuda") + c.extra);
  ASSERT_EQ(gpu.exit_code, 0) << gpu.output;
  const auto a = rl_metrics(dir + "/cpu"), b = rl_metrics(dir + "/gpu");
  ASSERT_EQ(a.size(), b.size());
  ASSERT_GE(a.size(), 4u);
  // Until its first step the policy is the reference (its own log-probs stand for the
  // reference's), so the first step's KL is 0 on both, up to rounding without a KL term (the
  // rows left out of training contribute k3(sampling log-probs, reference), two passes).
  EXPECT_LT(a[0].at("kl").get<double>(), 1e-10);
  EXPECT_LT(b[0].at("kl").get<double>(), 1e-10);
  double loss_err = 0.0, entropy_err = 0.0, kl_err = 0.0;
  bool signal = false;  // some group had mixed rewards (else nothing is compared)
  for (std::size_t i = 0; i < a.size(); ++i) {
    signal = signal || a[i].at("no_signal_frac").get<double>() < 1.0;
    for (const char* key : {"reward_mean", "completion_len_mean", "no_signal_frac", "ppo_epoch"})
      EXPECT_EQ(a[i].at(key), b[i].at(key)) << key << " at step " << i + 1;
    EXPECT_EQ(a[i].contains("exact_match"), b[i].contains("exact_match"));
    if (a[i].contains("exact_match")) {
      EXPECT_EQ(a[i]["exact_match"], b[i]["exact_match"]) << "step " << i + 1;
    }
    auto diff = [&](const char* key) {
      return std::abs(a[i].at(key).get<double>() - b[i].at(key).get<double>());
    };
    loss_err = std::max(loss_err, diff("train_loss"));
    entropy_err = std::max(entropy_err, diff("entropy"));
    kl_err = std::max(kl_err, diff("kl"));
    // The KL grows to ~1 at lr 0.01: relative past 1e-2.
    EXPECT_LT(diff("kl"), 1e-5 + 1e-3 * std::abs(a[i].at("kl").get<double>())) << "step " << i + 1;
    EXPECT_NEAR(a[i].at("clip_frac").get<double>(), b[i].at("clip_frac").get<double>(), 0.1);
  }
  TensorFile ca = load_safetensors(dir + "/cpu/checkpoint.safetensors");
  TensorFile cb = load_safetensors(dir + "/gpu/checkpoint.safetensors");
  double worst = 0.0;
  std::string worst_name;
  for (const auto& [name, t] : ca.tensors) {
    if (name.rfind("model.", 0) != 0) continue;
    ASSERT_TRUE(cb.tensors.count(name)) << name;
    const double err = test::rel_frobenius_diff(cb.tensors.at(name), t);
    if (err > worst) {
      worst = err;
      worst_name = name;
    }
  }
  std::printf(
      "rl %s: %zu steps, rewards/lengths equal; worst |cpu - gpu|: loss %.2e, entropy "
      "%.2e, kl %.2e; final weights %.2e (%s)\n",
      c.name.c_str(), a.size(), loss_err, entropy_err, kl_err, worst, worst_name.c_str());
  EXPECT_TRUE(signal) << "every sampled group had equal rewards: the fixture trains nothing";
  EXPECT_LT(loss_err, 1e-4);
  EXPECT_LT(entropy_err, 1e-4);
  EXPECT_LT(worst, 1e-4) << worst_name;
  EXPECT_NE(gpu.output.find("held-out exact match"), std::string::npos) << gpu.output;
  EXPECT_EQ(read_json_file(dir + "/cpu/summary.json")["exact_match"],
            read_json_file(dir + "/gpu/summary.json")["exact_match"]);
}

INSTANTIATE_TEST_SUITE_P(
    Rl, CudaRlParity,
    ::testing::Values(RlCase{"adamw_no_kl", " --optimizer adamw --max_iters 4 --kl_coef 0"},
                      RlCase{"muon_kl_ppo2",
                             " --optimizer muon --max_iters 6 --kl_coef 0.05 --ppo_epochs 2"}),
    [](const ::testing::TestParamInfo<RlCase>& info) { return info.param.name; });

// A GPU rl run stopped after step 3 (between the two PPO epochs of the second batch, which the
// checkpoint then holds) and resumed ends bit for bit where the straight run does, samples of
// its third batch included; the metrics are the same records.
TEST(CudaRl, ResumeIsExact) {
  PION_REQUIRE_GPU_RUN();
  const std::string dir = rl_fixture().dir + "/resume";
  const std::string extra = " --optimizer muon --max_iters 6 --kl_coef 0.05 --ppo_epochs 2";
  auto a = test::run_pion(rl_flags(dir + "/a", "cuda") + extra);
  ASSERT_EQ(a.exit_code, 0) << a.output;
  auto b1 = test::run_pion(rl_flags(dir + "/b", "cuda") + extra + " --stop_after 3");
  ASSERT_EQ(b1.exit_code, 0) << b1.output;
  auto b2 = test::run_pion(rl_flags(dir + "/b", "cuda") + extra + " --resume");
  ASSERT_EQ(b2.exit_code, 0) << b2.output;
  EXPECT_NE(b2.output.find("resumed from"), std::string::npos) << b2.output;
  ASSERT_NO_FATAL_FAILURE(test::expect_same_tensors(dir + "/a/checkpoint.safetensors",
                                                    dir + "/b/checkpoint.safetensors"));
  EXPECT_EQ(rl_metrics(dir + "/a"), rl_metrics(dir + "/b"));
  EXPECT_EQ(read_json_file(dir + "/a/summary.json")["exact_match"],
            read_json_file(dir + "/b/summary.json")["exact_match"]);
}
