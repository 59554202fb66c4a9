// End-to-end tests of `pion train / finetune / eval / sample` through the binary: bit-exact
// resume for each optimizer, Ctrl-C, and clear errors for bad input.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "helpers.h"
#include "pion/core/error.h"
#include "pion/core/safetensors.h"
#include "pion/train/config.h"

using namespace pion;
namespace fs = std::filesystem;

namespace {

// A small UTF-8 corpus: the start of tinyshakespeare when ../shared is beside the checkout,
// otherwise generated text with digits (the finetuning test needs '0'-'9', '+', '=').
std::string make_corpus(const std::string& dir) {
  std::string text;
  std::ifstream in(test::source_dir() + "/../shared/data/tinyshakespeare.txt");
  if (in) {
    text.resize(60000);
    in.read(text.data(), static_cast<std::streamsize>(text.size()));
    text.resize(static_cast<std::size_t>(in.gcount()));
  }
  for (int i = 0; i < 3000; ++i)
    text += std::to_string(i * 7 % 1000) + "+" + std::to_string(i % 97) + "=\n";
  const std::string path = dir + "/corpus.txt";
  std::ofstream(path) << text;
  return path;
}

std::string tiny_flags(const std::string& data, const std::string& out,
                       const std::string& optimizer) {
  return "--data " + data + " --out_dir " + out + " --optimizer " + optimizer +
         " --n_layer 2 --n_head 2 --d_model 32 --seq_len 16 --batch_size 4 --max_iters 12"
         " --warmup_iters 3 --eval_interval 6 --eval_iters 2 --log_interval 4 --threads 1"
         " --matrix_lr 0.02 --lr 0.003 --dropout 0.1";
}

// The error is one line, the last one, and the only one (progress lines may precede it).
bool single_error_line(const std::string& output) {
  const auto at = output.find("pion: error:");
  return at != std::string::npos && (at == 0 || output[at - 1] == '\n') &&
         output.find("pion: error:", at + 12) == std::string::npos &&
         output.find('\n', at) == output.size() - 1;
}

}  // namespace

class ResumeTest : public ::testing::TestWithParam<std::string> {};

// Training 12 steps straight and training 5, stopping, then resuming to 12 must give the same
// weights and optimizer state bit for bit (dropout on, so its RNG state is restored too).
TEST_P(ResumeTest, ResumeIsBitExact) {
  const std::string dir = test::temp_dir("resume");
  const std::string corpus = make_corpus(dir);
  const std::string opt = GetParam();
  auto straight = test::run_pion("train " + tiny_flags(corpus, dir + "/a", opt));
  ASSERT_EQ(straight.exit_code, 0) << straight.output;
  auto first = test::run_pion("train " + tiny_flags(corpus, dir + "/b", opt) + " --stop_after 5");
  ASSERT_EQ(first.exit_code, 0) << first.output;
  auto second = test::run_pion("train " + tiny_flags(corpus, dir + "/b", opt) + " --resume");
  ASSERT_EQ(second.exit_code, 0) << second.output;
  EXPECT_NE(second.output.find("resumed from"), std::string::npos);

  TensorFile a = load_safetensors(dir + "/a/checkpoint.safetensors");
  TensorFile b = load_safetensors(dir + "/b/checkpoint.safetensors");
  ASSERT_EQ(a.tensors.size(), b.tensors.size());
  for (const auto& [name, t] : a.tensors) {
    ASSERT_TRUE(b.tensors.count(name)) << name;
    const Tensor& u = b.tensors.at(name);
    ASSERT_EQ(t.nbytes(), u.nbytes()) << name;
    EXPECT_EQ(0, std::memcmp(t.raw(), u.raw(), t.nbytes())) << name << " differs after resume";
  }
  auto sa = read_json_file(dir + "/a/summary.json");
  auto sb = read_json_file(dir + "/b/summary.json");
  EXPECT_EQ(sa["final_val_loss"], sb["final_val_loss"]);
  EXPECT_EQ(sb["iters"], 12);
}

INSTANTIATE_TEST_SUITE_P(Optimizers, ResumeTest, ::testing::Values("adamw", "muon", "pion"));

TEST(Train, WritesMetricsSummaryAndReportsPionSpectrum) {
  const std::string dir = test::temp_dir("metrics");
  const std::string corpus = make_corpus(dir);
  auto r = test::run_pion("train " + tiny_flags(corpus, dir + "/p", "pion") + " --init spectral");
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

TEST(Train, FinetuneEvalAndSampleWork) {
  const std::string dir = test::temp_dir("ft");
  const std::string corpus = make_corpus(dir);
  auto pre = test::run_pion("train " + tiny_flags(corpus, dir + "/pre", "adamw"));
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
}

TEST(Train, CtrlCSavesACheckpointThatResumes) {
  const std::string dir = test::temp_dir("sigint");
  const std::string corpus = make_corpus(dir);
  const std::string out = dir + "/run";
  const std::string cmd = std::string(PION_BINARY) + " train " + tiny_flags(corpus, out, "adamw") +
                          " --max_iters 1000000 --eval_interval 0";
  auto r = test::run_command("(" + cmd + " > " + dir +
                             "/log.txt 2>&1 & pid=$!; "
                             "for i in $(seq 600); do [ -s " +
                             out +
                             "/metrics.jsonl ] && break; sleep 0.1; done; "
                             "kill -INT $pid; wait $pid; echo rc=$?)");
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
      {"train --resume --out_dir " + dir + "/nothing_here", "no checkpoint"},
      {"sample --checkpoint " + dir + "/bad.safetensors", "bad.safetensors"},
      {"eval --checkpoint " + dir + "/missing.safetensors --tasks x.jsonl", "missing.safetensors"},
  };
  for (const auto& c : cases) {
    auto r = test::run_pion(c.args);
    EXPECT_EQ(r.exit_code, 2) << c.args << "\n" << r.output;
    EXPECT_TRUE(single_error_line(r.output)) << c.args << "\n" << r.output;
    EXPECT_NE(r.output.find(c.needle), std::string::npos) << c.args << "\n" << r.output;
  }
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
