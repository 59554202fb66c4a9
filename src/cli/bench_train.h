#pragma once
// `pion bench train`: training tokens/s of each optimizer on one model shape, through the
// real trainer (CPU or CUDA) on random tokens, without checkpoints or spectra.
#include <CLI/CLI.hpp>
#include <memory>
#include <string>

namespace pion::cli {

struct BenchTrainArgs {
  std::string device = "cuda";
  std::string preset = "gpt2-small";  // gpt2-small | baby
  std::string optimizers = "adamw,muon,pion";
  int steps = 30;  // timed steps
  int warmup = 5;  // untimed steps first (kernel loading, graph capture, allocator)
  int batch = 0;   // 0 = the preset's
  int layers = 0;  // 0 = the preset's
  int seq_len = 0;  // 0 = the preset's
  // > 0: step N of each optimizer's run is bracketed with cudaProfilerStart/Stop (the range
  // nsys/ncu capture, and the emulator's EMU_COUNT window; --device cuda only).
  int profile_step = 0;
  std::string attention = "auto";
  std::string matmul_precision = "bf16";
  std::string pion_precision = "fp32";
  bool cuda_graphs = true;  // the trainer's cuda_graphs: false launches every kernel
  std::string json;  // also write the results here
};

// Adds the options to `cmd` (the `train` subcommand of `bench`) and its callback.
void add_bench_train_command(CLI::App& bench);
void run_bench_train(const BenchTrainArgs& args);

}  // namespace pion::cli
