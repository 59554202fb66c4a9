#pragma once
// `pion bench optim`: one optimizer step over the hidden matrices of a GPT-2-small-shaped
// LLaMA (CPU or GPU), beside the machine's GEMM roofline measured in the same run; Pion's
// spectrum drift on the GPU (fp32 and mixed).
//
// The pieces, one file each:
//   bench_optim.cpp           the subcommand, run_optim_bench, the CPU run
//   bench_optim_workload.cpp  the matrices, their GEMM lists and flop counts, the CPU
//                             optimizers (bench_optim_workload.h; bench/bench_optim.cpp
//                             times the same workload under Google Benchmark)
//   bench_optim_cuda.cpp      the GPU run (compiled under PION_HAVE_CUDA only)
//   bench_optim_report.cpp    the Markdown table on stdout, the JSON of --json
//   bench_optim_variants.cpp  --pion_variants: every Pion variant and AdamW on the CPU
//
// The PyTorch peer of `pion bench optim --device cuda` is bench/torch_optim.py --device cuda;
// scripts/gpu-bench.sh runs both and prints the ratios (bench/compare_optim.py).
#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "cli/bench_optim_workload.h"

namespace pion::cli {

// Adds the `optim` subcommand to `bench` (the `bench` subcommand of `pion`).
void add_bench_optim_command(CLI::App& bench);

namespace bench_optim {

struct OptimBenchArgs {
  std::string device = "cpu";
  int layers = 12;
  int steps = 20;  // 5 on the CPU unless given
  int warmup = 3;  // 1 on the CPU unless given
  int drift_steps = 1000;
  double drift_lr = 0.002;
  bool pion_variants = false;  // cpu: every Pion variant beside AdamW (bench_optim_variants.h)
  std::string json;
};

struct Stats {
  double median = 0.0, min = 0.0, max = 0.0;
};

// Median, min and max of a run's timings.
Stats stats_of(std::vector<double> v);

// One optimizer's measurements.
struct Result {
  std::string name;   // JSON key: pion_fp32, pion_mixed, muon_bf16, muon_fp32, adamw
  std::string label;  // table row
  std::string gemm;   // GEMM precision: fp32, tf32, bf16; empty for AdamW (no GEMMs)
  double lr = 0.0;
  std::vector<double> times_ms;  // one per timed step
  double wall_ms_per_step = 0.0;
  double gemm_flops = 0.0;      // per step
  double bytes = 0.0;           // AdamW: memory traffic per step
  double gemms_alone_ms = 0.0;  // GPU: the step's own GEMMs timed alone (0 = not measured)
  std::string timing;           // GPU: "graph", or "eager (...)" when the capture failed
  std::string error;            // the measurement failed: no times
  bool has_drift = false;
  double drift = 0.0;  // max over matrices of max_i |sigma_i - sigma0_i| / max sigma0
  std::string drift_worst;
  double drift_wall_s = 0.0;
  std::string drift_error;
};

// A Result holding what the workload says about a run: name, label, GEMM precision, learning
// rate and GEMM flops per step; a run without GEMMs (AdamW) gets its memory traffic per step
// over specs instead. The run adds its measurements.
Result make_result(const std::string& name, const std::string& label, const std::string& gemm,
                   double lr, double gemm_flops, const std::vector<MatrixSpec>& specs);

struct GemmRate {
  std::string owner;  // the optimizer whose step issues it: pion, muon
  Gemm gemm;
  std::string precision;
  Stats ms;
};

struct Report {
  std::string device, hardware, date, timing;
  int layers = 0, steps = 0, warmup = 0, drift_steps = 0;
  double drift_lr = 0.0;
  std::vector<MatrixSpec> specs;
  std::string roofline_gemm;           // "4096^3" (GPU) or "2048^3" (CPU)
  std::map<std::string, Stats> peak;   // roofline_gemm ms by precision
  std::map<std::string, double> rate;  // FLOP/s of roofline_gemm by precision
  std::vector<GemmRate> shape_rates;   // the steps' own GEMMs (GPU)
  std::vector<Result> results;
  std::vector<std::string> failures;  // measurements other than the steps that failed
  double wall_s = 0.0;
};

using Clock = std::chrono::steady_clock;

inline double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// printf-formats one number (also used by the runs' progress lines on stderr).
std::string fmt(const char* format, double v);
// Milliseconds with 3 significant digits or more.
std::string fmt_ms(double ms);

// "<model>, N logical CPUs, N OpenMP threads, N OpenBLAS threads".
std::string cpu_hardware_text();

// ---- the runs: each fills the hardware, timing, rooflines and results of `r` ------------

void run_cpu(const OptimBenchArgs& a, Report& r);
#ifdef PION_HAVE_CUDA
void run_cuda(const OptimBenchArgs& a, Report& r);
#endif

// ---- the report: Markdown on stdout, JSON to --json ------------------------------------

void print_report(const Report& r);
nlohmann::json report_json(const Report& r);
void write_json(const std::string& path, const nlohmann::json& j);

}  // namespace bench_optim
}  // namespace pion::cli
