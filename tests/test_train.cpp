// End-to-end tests of `pion train / finetune / eval / sample` through the binary: bit-exact
// resume for each optimizer, Ctrl-C, SIGTERM, kill -9 after a periodic checkpoint, and clear
// errors for bad input.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>
#include <vector>

#include "compare.h"
#include "expect_error.h"
#include "helpers.h"
#include "pion/core/error.h"
#include "pion/core/safetensors.h"
#include "pion/core/random.h"
#include "pion/train/config.h"
#include "pion/train/metrics.h"
#include "pion/train/session.h"
#include "pion/train/trainer.h"

using namespace pion;
namespace fs = std::filesystem;
using test::expect_same_tensors;
using test::tiny_train_flags;

namespace {

// A small UTF-8 corpus: the start of tinyshakespeare when ../shared is beside the checkout,
// otherwise generated English text with every printable ASCII character; then arithmetic
// lines either way (the finetuning test needs '0'-'9', '+', '='; sampling prompts "The").
std::string make_corpus(const std::string& dir) {
  std::string text;
  std::ifstream in(test::shared_data_path("tinyshakespeare.txt"));
  if (in) {
    text.resize(60000);
    in.read(text.data(), static_cast<std::streamsize>(text.size()));
    text.resize(static_cast<std::size_t>(in.gcount()));
  } else {
    text = test::fallback_corpus(60000);
  }
  for (int i = 0; i < 3000; ++i)
    text += std::to_string(i * 7 % 1000) + "+" + std::to_string(i % 97) + "=\n";
  const std::string path = dir + "/corpus.txt";
  std::ofstream(path) << text;
  return path;
}

// The step a checkpoint holds.
int checkpoint_step(const std::string& path) {
  TensorFile f = load_safetensors(path);
  return nlohmann::json::parse(f.metadata.at("pion.train")).at("step").get<int>();
}

// The "step" of every line of a metrics.jsonl (every line must be a JSON object).
std::vector<int> metrics_steps(const std::string& path) {
  std::ifstream in(path);
  std::vector<int> steps;
  std::string line;
  while (std::getline(in, line)) steps.push_back(nlohmann::json::parse(line).at("step").get<int>());
  return steps;
}

// The tiny AdamW run made endless (max_iters 1000000, no evals) for the tests that stop it with
// a signal: a shell command line for background(); `extra` flags go last.
std::string endless_train(const std::string& corpus, const std::string& out,
                          const std::string& extra = "") {
  return std::string(PION_BINARY) + " train " + tiny_train_flags(corpus, out, "adamw") +
         " --max_iters 1000000 --eval_interval 0" + extra;
}

// A shell line that starts `command` in the background (output to `log`), waits (up to 60 s)
// until the shell test `ready` holds, runs `then` (which may use $pid) and prints "rc=N", the
// command's exit status as the shell reports it (128 + N for a death by signal N).
std::string background(const std::string& command, const std::string& log, const std::string& ready,
                       const std::string& then) {
  return "(" + command + " > " + log + " 2>&1 & pid=$!; for i in $(seq 600); do " + ready +
         " && break; sleep 0.1; done; " + then + "; wait $pid; echo rc=$?)";
}

}  // namespace

class ResumeTest : public ::testing::TestWithParam<std::string> {};

// Training 12 steps straight and training 5, stopping, then resuming to 12 must give the same
// weights and optimizer state bit for bit (dropout on, so its RNG state is restored too).
TEST_P(ResumeTest, ResumeIsBitExact) {
  const std::string dir = test::temp_dir("resume");
  const std::string corpus = make_corpus(dir);
  const std::string opt = GetParam();
  auto straight = test::run_pion("train " + tiny_train_flags(corpus, dir + "/a", opt));
  ASSERT_EQ(straight.exit_code, 0) << straight.output;
  auto first =
      test::run_pion("train " + tiny_train_flags(corpus, dir + "/b", opt) + " --stop_after 5");
  ASSERT_EQ(first.exit_code, 0) << first.output;
  auto second = test::run_pion("train " + tiny_train_flags(corpus, dir + "/b", opt) + " --resume");
  ASSERT_EQ(second.exit_code, 0) << second.output;
  EXPECT_NE(second.output.find("resumed from"), std::string::npos);

  expect_same_tensors(dir + "/a/checkpoint.safetensors", dir + "/b/checkpoint.safetensors");
  auto sa = read_json_file(dir + "/a/summary.json");
  auto sb = read_json_file(dir + "/b/summary.json");
  EXPECT_EQ(sa["final_val_loss"], sb["final_val_loss"]);
  EXPECT_EQ(sb["iters"], 12);
}

INSTANTIATE_TEST_SUITE_P(Optimizers, ResumeTest, ::testing::Values("adamw", "muon", "pion"));

// A grouped-query, tied-embedding model with a non-default RoPE base and RMSNorm epsilon, set
// from `pion train` keys: the checkpoint records them (and has no lm_head), and training 12
// steps straight equals 5 + resume to 12 bit for bit.
TEST_P(ResumeTest, GqaTiedModelResumesBitExactly) {
  const std::string dir = test::temp_dir("resume_gqa");
  const std::string corpus = make_corpus(dir);
  const std::string opt = GetParam();
  const std::string model =
      " --n_head 4 --n_kv_head 2 --tie_embeddings true"
      " --rope_theta 50000 --norm_eps 1e-4 --init spectral";
  auto straight = test::run_pion("train " + tiny_train_flags(corpus, dir + "/a", opt) + model);
  ASSERT_EQ(straight.exit_code, 0) << straight.output;
  auto first = test::run_pion("train " + tiny_train_flags(corpus, dir + "/b", opt) + model +
                              " --stop_after 5");
  ASSERT_EQ(first.exit_code, 0) << first.output;
  auto second =
      test::run_pion("train " + tiny_train_flags(corpus, dir + "/b", opt) + model + " --resume");
  ASSERT_EQ(second.exit_code, 0) << second.output;
  EXPECT_NE(second.output.find("resumed from"), std::string::npos);
  expect_same_tensors(dir + "/a/checkpoint.safetensors", dir + "/b/checkpoint.safetensors");

  TensorFile ckpt = load_safetensors(dir + "/a/checkpoint.safetensors");
  const auto m = nlohmann::json::parse(ckpt.metadata.at("pion.model_config"));
  EXPECT_EQ(m.at("n_kv_head"), 2);
  EXPECT_EQ(m.at("tie_embeddings"), true);
  EXPECT_EQ(m.at("rope_theta"), 50000.0);
  EXPECT_EQ(m.at("norm_eps"), 1e-4);
  EXPECT_EQ(ckpt.tensors.count("model.lm_head.weight"), 0u);
  EXPECT_EQ(ckpt.tensors.at("model.layers.0.attn.wk").shape(), (Shape{16, 32}));
  EXPECT_EQ(ckpt.tensors.at("model.layers.1.attn.wv").shape(), (Shape{16, 32}));
  // A resume with another head count is refused by name, not silently reshaped.
  auto other = test::run_pion("train " + tiny_train_flags(corpus, dir + "/b", opt) +
                              " --n_head 4 --n_kv_head 1 --tie_embeddings true --rope_theta 50000"
                              " --norm_eps 1e-4 --init spectral --max_iters 14 --resume");
  EXPECT_EQ(other.exit_code, 2) << other.output;
}

TEST(Train, WritesMetricsSummaryAndReportsPionSpectrum) {
  const std::string dir = test::temp_dir("metrics");
  const std::string corpus = make_corpus(dir);
  auto r =
      test::run_pion("train " + tiny_train_flags(corpus, dir + "/p", "pion") + " --init spectral");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("tok/s"), std::string::npos);
  EXPECT_NE(r.output.find("ETA"), std::string::npos);
  auto summary = read_json_file(dir + "/p/summary.json");
  for (const char* key : {"best_val_loss", "final_val_loss", "iters", "tokens_per_sec",
                          "spectrum_drift_max", "skipped_steps"})
    EXPECT_TRUE(summary.contains(key)) << key;
  EXPECT_GT(summary["spectrum_drift_max"].get<double>(), 0.0);
  EXPECT_LT(summary["spectrum_drift_max"].get<double>(), 0.05);
  std::ifstream metrics(dir + "/p/metrics.jsonl");
  std::string line;
  int lines = 0, with_val = 0;
  while (std::getline(metrics, line)) {
    auto j = nlohmann::json::parse(line);
    ++lines;
    with_val += j.contains("val_loss") ? 1 : 0;
    EXPECT_TRUE(j.contains("lr") && j.contains("train_loss") && j.contains("grad_norm") &&
                j.contains("tokens_per_sec"));
  }
  EXPECT_EQ(lines, 12);
  EXPECT_EQ(with_val, 2);
  // The spectrum Pion trains with is recorded: spectral init gives sqrt(d_out/d_in) = 1 for wq.
  auto init = read_json_file(dir + "/p/spectrum_init.json");
  bool found = false;
  for (const auto& m : init)
    if (m["name"] == "layers.0.attn.wq") {
      found = true;
      for (double s : m["sigma"]) EXPECT_NEAR(s, 1.0, 1e-4);
    }
  EXPECT_TRUE(found);
}

// TrainInputs::on_step brackets every step, in order: (1, begin) (1, end) (2, begin) ... (what
// `pion bench train --profile_step` hangs cudaProfilerStart / Stop on).
TEST(Train, OnStepBracketsEachStep) {
  struct Counting : BatchSource {
    void next(std::vector<std::int32_t>& in, std::vector<std::int32_t>& out) override {
      in.resize(2 * 8);
      out.resize(in.size());
      for (std::size_t i = 0; i < in.size(); ++i) {
        in[i] = static_cast<std::int32_t>((i + n) % 32);
        out[i] = static_cast<std::int32_t>((i + n + 1) % 32);
      }
      ++n;
    }
    nlohmann::json state() const override { return n; }
    void restore(const nlohmann::json& s) override { n = s.get<int>(); }
    int n = 0;
  };
  TrainConfig cfg;
  cfg.n_layer = 1;
  cfg.n_head = 2;
  cfg.d_model = 16;
  cfg.seq_len = 8;
  cfg.batch_size = 2;
  cfg.max_iters = 3;
  cfg.warmup_iters = 1;
  cfg.eval_interval = 0;
  cfg.out_dir = test::temp_dir("on_step") + "/run";
  Llama<float> model(model_config_for(cfg, 32));
  Rng rng(cfg.seed);
  model.init_weights(rng);
  TrainInputs in;
  in.config = cfg;
  in.train_source = std::make_unique<Counting>();
  in.benchmark_only = true;
  std::vector<std::pair<int, bool>> calls;
  in.on_step = [&](int step, bool begin) { calls.emplace_back(step, begin); };
  run_training(std::move(in), model);
  const std::vector<std::pair<int, bool>> want = {{1, true}, {1, false}, {2, true},
                                                  {2, false}, {3, true}, {3, false}};
  EXPECT_EQ(calls, want);
}

TEST(Train, FinetuneEvalAndSampleWork) {
  const std::string dir = test::temp_dir("ft");
  const std::string corpus = make_corpus(dir);
  auto pre = test::run_pion("train " + tiny_train_flags(corpus, dir + "/pre", "adamw"));
  ASSERT_EQ(pre.exit_code, 0) << pre.output;
  auto task =
      test::run_pion("make-task arithmetic --out " + dir + "/add.jsonl --n 60 --max_digits 2");
  ASSERT_EQ(task.exit_code, 0) << task.output;
  auto ft = test::run_pion("finetune --from " + dir + "/pre/checkpoint.safetensors --tasks " + dir +
                           "/add.jsonl --out_dir " + dir +
                           "/ft --max_iters 6 --eval_interval 3 "
                           "--eval_examples 5 --threads 1");
  ASSERT_EQ(ft.exit_code, 0) << ft.output;
  auto summary = read_json_file(dir + "/ft/summary.json");
  EXPECT_TRUE(summary.contains("exact_match"));
  EXPECT_EQ(summary["iters"], 6);
  auto ev =
      test::run_pion("eval --checkpoint " + dir + "/ft/checkpoint.safetensors --tasks " + dir +
                     "/add.jsonl --max_examples 4 --data " + dir + "/pre/data --batches 2");
  ASSERT_EQ(ev.exit_code, 0) << ev.output;
  EXPECT_NE(ev.output.find("perplexity"), std::string::npos);
  EXPECT_NE(ev.output.find("exact match"), std::string::npos);
  auto sample = test::run_pion("sample --checkpoint " + dir +
                               "/pre/checkpoint.safetensors --prompt The "
                               "--tokens 20 --temperature 0.8 --top_k 5");
  ASSERT_EQ(sample.exit_code, 0) << sample.output;
  EXPECT_GT(sample.output.size(), 20u);
  // Several samples decoded together: each printed after the prompt, separated by "---"
  // lines, and the same seed prints the same text again.
  const std::string batch_args = "sample --checkpoint " + dir +
                                 "/pre/checkpoint.safetensors --prompt The --tokens 12 "
                                 "--temperature 0.9 --top_p 0.9 --samples 3 --seed 4";
  auto batch = test::run_pion(batch_args);
  ASSERT_EQ(batch.exit_code, 0) << batch.output;
  std::size_t separators = 0;
  for (std::size_t at = batch.output.find("\n---\nThe"); at != std::string::npos;
       at = batch.output.find("\n---\nThe", at + 1))
    ++separators;
  EXPECT_EQ(separators, 2u) << batch.output;
  EXPECT_EQ(batch.output.rfind("The", 0), 0u) << batch.output;
  EXPECT_EQ(test::run_pion(batch_args).output, batch.output);
  EXPECT_NE(test::run_pion("sample --checkpoint " + dir +
                           "/pre/checkpoint.safetensors --top_p 0").exit_code, 0);
  // A precision that does not exist is refused even where it would not be used (the CPU).
  auto bad = test::run_pion("sample --checkpoint " + dir +
                            "/pre/checkpoint.safetensors --tokens 2 --matmul_precision bf17");
  EXPECT_EQ(bad.exit_code, 2) << bad.output;
  EXPECT_NE(bad.output.find("matmul_precision"), std::string::npos) << bad.output;
}

TEST(Train, CtrlCSavesACheckpointThatResumes) {
  const std::string dir = test::temp_dir("sigint");
  const std::string corpus = make_corpus(dir);
  const std::string out = dir + "/run";
  const std::string cmd = endless_train(corpus, out);
  auto r = test::run_command(
      background(cmd, dir + "/log.txt", "[ -s " + out + "/metrics.jsonl ]", "kill -INT $pid"));
  EXPECT_NE(r.output.find("rc=0"), std::string::npos) << r.output;
  ASSERT_TRUE(fs::exists(out + "/checkpoint.safetensors"));
  auto summary = read_json_file(out + "/summary.json");
  EXPECT_TRUE(summary["interrupted"].get<bool>());
  const int steps = summary["iters"].get<int>();
  auto resumed = test::run_pion("train --out_dir " + out + " --resume --max_iters " +
                                std::to_string(steps + 2));
  EXPECT_EQ(resumed.exit_code, 0) << resumed.output;
  EXPECT_EQ(read_json_file(out + "/summary.json")["iters"].get<int>(), steps + 2);
}

// SIGTERM (what a cluster scheduler sends before it kills a job) is handled like Ctrl-C: the
// step finishes, a checkpoint is saved, the run exits 0 saying which signal arrived, and the
// resumed run ends with the weights of a run never interrupted, bit for bit. The run is long
// (max_iters 100000) so the signal lands mid-run; both runs then end at the same step through
// --stop_after, which keeps the schedule of max_iters 100000.
TEST(Train, SigtermSavesACheckpointThatResumesBitExactly) {
  const std::string dir = test::temp_dir("sigterm");
  const std::string corpus = make_corpus(dir);
  const std::string flags = " --max_iters 100000 --eval_interval 0 --log_interval 1000";
  const std::string out = dir + "/b";
  const std::string cmd =
      std::string(PION_BINARY) + " train " + tiny_train_flags(corpus, out, "muon") + flags;
  // Wait for a few steps' records, then SIGTERM.
  auto r = test::run_command(background(
      cmd, dir + "/log.txt", "[ $(cat " + out + "/metrics.jsonl 2>/dev/null | wc -l) -ge 3 ]",
      "kill -TERM $pid"));
  const std::string log = test::run_command("cat " + dir + "/log.txt").output;
  ASSERT_NE(r.output.find("rc=0"), std::string::npos) << r.output << log;
  EXPECT_NE(log.find("SIGTERM received"), std::string::npos) << log;
  EXPECT_NE(log.find("interrupted by SIGTERM: checkpoint saved to"), std::string::npos) << log;
  auto summary = read_json_file(out + "/summary.json");
  ASSERT_TRUE(summary["interrupted"].get<bool>()) << log;
  const int stopped = summary["iters"].get<int>();
  ASSERT_GE(stopped, 3);
  ASSERT_LT(stopped, 100000);
  EXPECT_EQ(checkpoint_step(out + "/checkpoint.safetensors"), stopped);

  const std::string end = " --stop_after " + std::to_string(stopped + 4);
  auto resumed =
      test::run_pion("train " + tiny_train_flags(corpus, out, "muon") + flags + " --resume" + end);
  ASSERT_EQ(resumed.exit_code, 0) << resumed.output;
  auto straight =
      test::run_pion("train " + tiny_train_flags(corpus, dir + "/a", "muon") + flags + end);
  ASSERT_EQ(straight.exit_code, 0) << straight.output;
  EXPECT_EQ(checkpoint_step(out + "/checkpoint.safetensors"), stopped + 4);
  expect_same_tensors(dir + "/a/checkpoint.safetensors", out + "/checkpoint.safetensors");
  // One record per step, none twice.
  std::vector<int> steps = metrics_steps(out + "/metrics.jsonl");
  ASSERT_EQ(steps.size(), static_cast<std::size_t>(stopped + 4));
  for (std::size_t i = 0; i < steps.size(); ++i) EXPECT_EQ(steps[i], static_cast<int>(i) + 1);
}

// A second stop signal quits at once (no checkpoint, no summary), with 128 + its number. The
// process is stopped while both signals are sent, so both are delivered when it continues
// (two different signals: the same one twice could merge into one pending signal); which
// handler runs first is the kernel's choice, so the status is 130 or 143.
TEST(Train, SecondStopSignalQuitsAtOnce) {
  const std::string dir = test::temp_dir("twosignals");
  const std::string corpus = make_corpus(dir);
  const std::string out = dir + "/run";
  const std::string cmd = endless_train(corpus, out, " --log_interval 1000");
  auto r = test::run_command(
      background(cmd, dir + "/log.txt", "[ -s " + out + "/metrics.jsonl ]",
                 "kill -STOP $pid; kill -TERM $pid; kill -INT $pid; kill -CONT $pid"));
  const std::string log = test::run_command("cat " + dir + "/log.txt").output;
  EXPECT_TRUE(r.output.find("rc=143") != std::string::npos ||
              r.output.find("rc=130") != std::string::npos)
      << r.output << log;
  EXPECT_NE(log.find(" received: finishing this step"), std::string::npos) << log;
  EXPECT_FALSE(fs::exists(out + "/summary.json"));
  EXPECT_FALSE(fs::exists(out + "/checkpoint.safetensors"));
}

// kill -9 after a periodic checkpoint (checkpoint_minutes): the checkpoint is intact and
// resumes; records written after it (and a line cut short) are dropped from metrics.jsonl, so
// the resumed run's file has every step once, in order.
TEST(Train, KilledRunResumesFromPeriodicCheckpointWithCleanMetrics) {
  const std::string dir = test::temp_dir("sigkill");
  const std::string corpus = make_corpus(dir);
  const std::string out = dir + "/run";
  // A checkpoint every 0.3 s of wall time (steps take about a millisecond).
  const std::string cmd =
      endless_train(corpus, out, " --log_interval 1000 --checkpoint_minutes 0.005");
  auto r = test::run_command(background(cmd, dir + "/log.txt",
                                        "[ -s " + out + "/checkpoint.safetensors ]",
                                        "sleep 0.2; kill -KILL $pid"));
  const std::string log = test::run_command("cat " + dir + "/log.txt").output;
  ASSERT_NE(r.output.find("rc=137"), std::string::npos) << r.output << log;
  ASSERT_TRUE(fs::exists(out + "/checkpoint.safetensors")) << log;
  EXPECT_FALSE(fs::exists(out + "/summary.json"));  // killed: never got that far
  const int saved = checkpoint_step(out + "/checkpoint.safetensors");
  ASSERT_GT(saved, 0);
  const std::size_t written = metrics_steps(out + "/metrics.jsonl").size();
  EXPECT_GE(written, static_cast<std::size_t>(saved));
  // As if the kill had landed mid-write too.
  std::ofstream(out + "/metrics.jsonl", std::ios::app) << R"({"step": )";

  const int end = static_cast<int>(written) + 5;
  auto resumed =
      test::run_pion("train --out_dir " + out + " --resume --max_iters " + std::to_string(end));
  ASSERT_EQ(resumed.exit_code, 0) << resumed.output;
  EXPECT_NE(resumed.output.find("at step " + std::to_string(saved)), std::string::npos)
      << resumed.output;
  EXPECT_NE(resumed.output.find("dropped"), std::string::npos) << resumed.output;
  std::vector<int> steps = metrics_steps(out + "/metrics.jsonl");
  ASSERT_EQ(steps.size(), static_cast<std::size_t>(end));
  for (std::size_t i = 0; i < steps.size(); ++i)
    ASSERT_EQ(steps[i], static_cast<int>(i) + 1) << "metrics.jsonl: record " << i;
  EXPECT_EQ(read_json_file(out + "/summary.json")["iters"].get<int>(), end);
  EXPECT_FALSE(fs::exists(out + "/metrics.jsonl.tmp"));
}

TEST(Metrics, ResumeKeepsRecordsThroughTheCheckpointStep) {
  const std::string dir = test::temp_dir("jsonl");
  const std::string path = dir + "/metrics.jsonl";
  std::ofstream(path) << "{\"step\":1,\"x\":1}\n{\"step\":2}\n{\"step\":3}\nnot json\n"
                         "{\"step\":4}\n{\"step\":5}\n{\"step\":3";
  {
    JsonlWriter w = JsonlWriter::resume(path, 3);
    w.write({{"step", 4}});
  }
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  EXPECT_EQ(text.str(), "{\"step\":1,\"x\":1}\n{\"step\":2}\n{\"step\":3}\n{\"step\":4}\n");
  EXPECT_FALSE(fs::exists(path + ".tmp"));
  // No file yet (a run whose first checkpoint came before any record): created.
  JsonlWriter::resume(dir + "/new.jsonl", 0).write({{"step", 1}});
  EXPECT_EQ(metrics_steps(dir + "/new.jsonl"), std::vector<int>{1});
  // A fresh run truncates.
  JsonlWriter::create(path).write({{"step", 1}});
  EXPECT_EQ(metrics_steps(path), std::vector<int>{1});
}

TEST(Config, CheckpointMinutesMustBeFiniteAndNonNegative) {
  TrainConfig c;
  EXPECT_EQ(c.checkpoint_minutes, 10.0);
  c.checkpoint_minutes = 0.0;
  EXPECT_NO_THROW(c.validate());
  for (double bad :
       {-1.0, std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity()}) {
    c.checkpoint_minutes = bad;
    EXPECT_THROW(c.validate(), pion::Error) << bad;
  }
}

TEST(Train, BadInputGivesOneClearLine) {
  const std::string dir = test::temp_dir("bad");
  std::ofstream(dir + "/empty.txt").close();
  std::ofstream(dir + "/latin1.txt") << "caf\xe9 au lait\n";
  std::ofstream(dir + "/cfg.json") << R"({"n_layer": 2, "learning_rate": 0.1})";
  std::ofstream(dir + "/broken.json") << R"({"n_layer": )";
  std::ofstream(dir + "/bad.safetensors") << "not a checkpoint at all";
  const std::string out = " --out_dir " + dir + "/out";
  struct Case {
    std::string args, needle;
  };
  const std::vector<Case> cases = {
      {"train --data " + dir + "/missing.txt" + out, "does not exist"},
      {"train --data " + dir + "/empty.txt" + out, "empty"},
      {"train --data " + dir + "/latin1.txt" + out + "2", "UTF-8"},
      {"train --config " + dir + "/cfg.json" + out, "learning_rate"},
      {"train --config " + dir + "/broken.json" + out, "not valid JSON"},
      {"train --n_layer abc" + out, "n_layer"},
      {"train --optimizer sgd" + out, "optimizer"},
      {"train --d_model 30 --n_head 4" + out, "d_model"},
      {"train --checkpoint_minutes -1" + out, "checkpoint_minutes"},
      {"train --checkpoint_minutes nan" + out, "checkpoint_minutes"},
      {"train --checkpoint_minutes inf" + out, "checkpoint_minutes"},
      {"train --resume --out_dir " + dir + "/nothing_here", "no checkpoint"},
      {"sample --checkpoint " + dir + "/bad.safetensors", "bad.safetensors"},
      {"eval --checkpoint " + dir + "/missing.safetensors --tasks x.jsonl", "missing.safetensors"},
  };
  for (const auto& c : cases) test::expect_cli_error(c.args, {c.needle});
}

TEST(Config, FlagsOverrideFileAndUnknownKeysFail) {
  TrainConfig c;
  apply_config_json(c,
                    nlohmann::json::parse(R"({"n_layer": 6, "optimizer": "pion", "lr": 0.003})"));
  EXPECT_EQ(c.n_layer, 6);
  EXPECT_EQ(c.optimizer, "pion");
  set_config_value(c, "n_layer", parse_flag_value("3"));
  EXPECT_EQ(c.n_layer, 3);
  EXPECT_THROW(set_config_value(c, "n_layers", 3), pion::Error);
  EXPECT_THROW(set_config_value(c, "n_layer", "three"), pion::Error);
  EXPECT_THROW(set_config_value(c, "n_layer", 2.5), pion::Error);
  c.d_model = 30;
  EXPECT_THROW(c.validate(), pion::Error);
}
