// `pion bench optim` through the binary: the CPU run prints its table and writes a JSON file
// with a positive time for every optimizer and the right flop counts; `--device cuda` without
// a GPU (or without the CUDA back end) is a one-line error with exit code 2. The GPU run
// itself is scripts/gpu-bench.sh's.
#include <gtest/gtest.h>

#include <algorithm>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>

#include "helpers.h"
#include "pion/core/device.h"

namespace {

using pion::test::run_pion;

// Pion's GEMM flops for one GPT-2-small layer (pion.h: 8 m n^2 + 6 m^2 n, m = d_out >= n =
// d_in, mirrored for 768 x 2048) and Muon's (5 x (4 r^2 c + 2 r^3), r <= c).
double pion_layer_flops() {
  const double s = 768, b = 2048;
  return 4 * (8 * s * s * s + 6 * s * s * s) + 3 * (8 * b * s * s + 6 * b * b * s);
}
double muon_layer_flops() {
  const double s = 768, b = 2048;
  return 4 * 5 * (4 * s * s * s + 2 * s * s * s) + 3 * 5 * (4 * s * s * b + 2 * s * s * s);
}

TEST(BenchCli, OptimOnCpuPrintsTableAndWritesJson) {
  const std::string dir = pion::test::temp_dir("bench_cli");
  const std::string json_path = dir + "/optim.json";
  // --warmup 0 keeps the test short (the first Pion step, with its SVD, is then timed).
  const auto r =
      run_pion("bench optim --device cpu --layers 1 --steps 2 --warmup 0 --json " + json_path);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("| optimizer | GEMMs | median ms |"), std::string::npos) << r.output;
  for (const char* row :
       {"| Pion taylor2 fp32 | fp32 |", "| Muon NS5 fp32 | fp32 |", "| AdamW | — |"})
    EXPECT_NE(r.output.find(row), std::string::npos) << "no table row " << row << ":\n" << r.output;

  std::ifstream in(json_path);
  ASSERT_TRUE(in.good()) << "no JSON written to " << json_path << ":\n" << r.output;
  const nlohmann::json j = nlohmann::json::parse(in);
  EXPECT_EQ(j.at("device"), "cpu");
  EXPECT_EQ(j.at("matrices"), 7);
  EXPECT_EQ(j.at("parameters"), 4 * 768 * 768 + 3 * 2048 * 768);
  EXPECT_GT(j.at("roofline").at("fp32").at("tflops").get<double>(), 0.0);
  for (const char* name : {"pion_fp32", "muon_fp32", "adamw"}) {
    SCOPED_TRACE(name);
    const nlohmann::json& o = j.at("optimizers").at(name);
    EXPECT_GT(o.at("median_ms").get<double>(), 0.0);
    ASSERT_EQ(o.at("times_ms").size(), 2u);
    for (const auto& t : o.at("times_ms")) EXPECT_GT(t.get<double>(), 0.0);
  }
  const auto& opts = j.at("optimizers");
  EXPECT_NEAR(opts.at("pion_fp32").at("gemm_flops").get<double>(), pion_layer_flops(), 1.0);
  EXPECT_NEAR(opts.at("muon_fp32").at("gemm_flops").get<double>(), muon_layer_flops(), 1.0);
  EXPECT_EQ(opts.at("adamw").at("gemm_flops").get<double>(), 0.0);
  EXPECT_GT(opts.at("pion_fp32").at("roofline_pct_fp32").get<double>(), 0.0);
}

TEST(BenchCli, OptimOnCudaWithoutGpuIsAClearError) {
  if (pion::cuda_device_count() > 0)
    GTEST_SKIP() << "a CUDA device is visible: scripts/gpu-bench.sh runs `pion bench optim "
                    "--device cuda` for real";
  const auto r = run_pion("bench optim --device cuda --json /nonexistent/never-written.json");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_EQ(r.output.rfind("pion: error: bench optim --device cuda: ", 0), 0u) << r.output;
  const char* why = pion::cuda_compiled() ? "no CUDA device is visible" : "no CUDA back end";
  EXPECT_NE(r.output.find(why), std::string::npos) << r.output;
  EXPECT_EQ(std::count(r.output.begin(), r.output.end(), '\n'), 1) << "not one line:\n" << r.output;
}

// A small `pion bench generate`: the table has the three paths of both prompt sets, every
// cached path reproduces the uncached tokens, and the JSON holds positive times.
TEST(BenchCli, GenerateComparesCachedWithUncachedInOneRun) {
  const std::string dir = pion::test::temp_dir("bench_generate");
  const std::string json_path = dir + "/generate.json";
  const auto r = run_pion(
      "bench generate --sequences 4 --tokens 6 --n_layer 1 --d_model 32 --seq_len 8 "
      "--max_prompt 5 --json " + json_path);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("| prompts | path | seconds | tokens/s | vs uncached | same tokens |"),
            std::string::npos)
      << r.output;
  EXPECT_EQ(r.output.find("| NO |"), std::string::npos) << r.output;
  std::ifstream in(json_path);
  ASSERT_TRUE(in.good()) << r.output;
  const nlohmann::json j = nlohmann::json::parse(in);
  ASSERT_EQ(j.at("results").size(), 6u);
  for (const auto& row : j.at("results")) {
    EXPECT_GT(row.at("seconds").get<double>(), 0.0);
    EXPECT_TRUE(row.at("same_tokens").get<bool>()) << row.dump();
  }
}

// `pion bench generate --device cuda`: without a GPU a one-line error before anything runs;
// with one (or the CUDA emulator's), the GPU's cached paths beside the CPU's, every path
// reproducing the uncached tokens (fp32 GEMMs by default).
TEST(BenchCli, GenerateOnCuda) {
  const std::string dir = pion::test::temp_dir("bench_generate_cuda");
  const std::string json_path = dir + "/generate.json";
  const auto r = run_pion(
      "bench generate --device cuda --sequences 3 --tokens 5 --n_layer 1 --d_model 32 "
      "--seq_len 8 --max_prompt 5 --json " +
      json_path);
  if (pion::cuda_device_count() == 0) {
    EXPECT_EQ(r.exit_code, 2) << r.output;
    const char* why =
        pion::cuda_compiled() ? "no CUDA device is visible" : "without the CUDA back end";
    EXPECT_NE(r.output.find(why), std::string::npos) << r.output;
    EXPECT_EQ(std::count(r.output.begin(), r.output.end(), '\n'), 1) << "not one line:\n"
                                                                     << r.output;
    EXPECT_FALSE(std::ifstream(json_path).good());
    return;
  }
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(r.output.find("| NO |"), std::string::npos) << r.output;
  const nlohmann::json j = nlohmann::json::parse(std::ifstream(json_path));
  EXPECT_EQ(j.at("device"), "cuda");
  ASSERT_EQ(j.at("results").size(), 8u);  // per prompt set: uncached, CPU batched, GPU x 2
  for (const auto& row : j.at("results"))
    EXPECT_TRUE(row.at("same_tokens").get<bool>()) << row.dump();
}

// Exit 2 with the CLI's prefix and a message that names what was wrong.
TEST(BenchCli, BadArgumentsAreRejected) {
  const std::pair<const char*, const char*> cases[] = {
      {"bench", "subcommand"},
      {"bench optim --device tpu", "--device"},
      {"bench optim --layers 0", "--layers"},
      {"bench optim --steps 0", "--steps"},
      {"bench nothing", "subcommand"},
      {"bench generate --sequences 0", "--sequences"},
      {"bench generate --device tpu", "--device"},
      {"bench optim --device cuda --pion_variants", "--pion_variants"},
      {"bench generate --matmul_precision bf17", "--matmul_precision"},
      {"bench train --device cpu --cuda_graphs maybe", "--cuda_graphs"},
      {"bench train --device cpu --attention cudnnn", "'attention'"}};
  for (const auto& [args, named] : cases) {
    const auto r = run_pion(args);
    EXPECT_EQ(r.exit_code, 2) << args << ":\n" << r.output;
    EXPECT_NE(r.output.find("pion: error:"), std::string::npos) << args << ":\n" << r.output;
    EXPECT_NE(r.output.find(named), std::string::npos)
        << args << ": the message should name " << named << ":\n"
        << r.output;
  }
}

}  // namespace
