#pragma once
// `pion bench generate`: text generation speed on the CPU, KV-cached and batched
// (pion/model/generate.h) against the uncached path that `pion sample` used before it
// (Llama::forward over the whole context per token, one sequence at a time), measured in the
// same run on the same random model and prompts, greedy, with a check that both produce the
// same tokens. With --device cuda the GPU's cached paths (pion/cuda/generate.h; the GEMMs in
// --matmul_precision) are timed too, beside the CPU's, with the same token check.
#include <CLI/CLI.hpp>
#include <string>

namespace pion::cli {

struct BenchGenerateArgs {
  int sequences = 64;
  int tokens = 64;         // new tokens per sequence
  int n_layer = 4;         // the baby model of scripts/main-job.sh by default
  int n_head = 4;
  int d_model = 128;
  int seq_len = 64;
  int vocab = 65;
  int max_prompt = 16;     // the mixed-prompt case draws prompt lengths in [1, max_prompt]
  int repeats = 1;         // each path runs this many times; the fastest run counts
  std::string device = "cpu";
  std::string matmul_precision = "fp32";  // cuda: the GEMMs (fp32 keeps the token check exact)
  std::string json;        // also write the results here
};

void add_bench_generate_command(CLI::App& bench);
void run_bench_generate(const BenchGenerateArgs& args);

}  // namespace pion::cli
