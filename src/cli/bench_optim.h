#pragma once
// `pion bench optim`: one optimizer step over the hidden matrices of a GPT-2-small-shaped
// LLaMA (CPU or GPU), beside the machine's GEMM roofline measured in the same run; Pion's
// spectrum drift on the GPU (fp32 and mixed).
//
// The pieces, one file each:
//   bench_optim.cpp           the subcommand, run_optim_bench, the CPU run
//   bench_optim_workload.cpp  the matrices, their GEMM lists and flop counts
//   bench_optim_cuda.cpp      the GPU run (compiled under PION_HAVE_CUDA only)
//   bench_optim_report.cpp    the Markdown table on stdout, the JSON of --json
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

#include "pion/core/tensor.h"

namespace pion::cli {

// Adds the `optim` subcommand to `bench` (the `bench` subcommand of `pion`).
void add_bench_optim_command(CLI::App& bench);

namespace bench_optim {

// ---- shared by the CPU and GPU runs ------------------------------------------------------

// The learning rates of a realistic run (the trainer's defaults: matrix_lr 0.02 for Muon and
// Pion, lr 1e-3 for AdamW). They change the numbers a step computes, not its work.
constexpr double kMatrixLr = 0.02;
constexpr double kAdamLr = 1e-3;
constexpr double kWeightStd = 0.02;  // GPT-2's init scale
constexpr double kGradStd = 1e-3;
constexpr int kMuonNsSteps = 5;  // Muon::Options and CudaMuonOptions default

struct OptimBenchArgs {
  std::string device = "cpu";
  int layers = 12;
  int steps = 20;  // 5 on the CPU unless given
  int warmup = 3;  // 1 on the CPU unless given
  int drift_steps = 1000;
  double drift_lr = 0.002;
  std::string json;
};

struct MatrixSpec {
  std::string name;
  std::int64_t rows = 0, cols = 0;  // d_out x d_in
};

// The hidden matrices of `layers` GPT-2-small-shaped LLaMA blocks (d_model 768, SwiGLU
// hidden 2048), named as the model names them: per layer four 768 x 768, two 2048 x 768
// and one 768 x 2048.
std::vector<MatrixSpec> gpt2_small_matrices(int layers);

// Matrices of each shape, in shape order (how the GPU optimizers batch them).
std::map<std::pair<std::int64_t, std::int64_t>, std::int64_t> shape_counts(
    const std::vector<MatrixSpec>& specs);

// Weights N(0, 0.02^2) and gradients N(0, 1e-3^2), one RNG stream per matrix (so the
// values do not depend on the thread count).
struct HostMatrices {
  std::vector<MatrixSpec> specs;
  std::vector<Tensor> weights, grads;
};

HostMatrices make_host_matrices(int layers);

std::int64_t parameter_count(const std::vector<MatrixSpec>& specs);

// One GEMM of an optimizer step, as the GPU optimizers issue it: C (m x n) = op(A) op(B)
// with inner size k, `batch` products in one call.
struct Gemm {
  std::int64_t m, n, k, batch;
  bool trans_a = false, trans_b = false;
  double flops() const {
    return 2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k) *
           static_cast<double>(batch);
  }
  auto key() const { return std::make_tuple(m, n, k, batch, trans_a, trans_b); }
};

// The GEMMs of one Pion taylor2 step and of one Muon Newton-Schulz step over `specs`, per
// shape group (bench_optim_workload.cpp says which products they are).
std::vector<Gemm> pion_step_gemms(const std::vector<MatrixSpec>& specs);
std::vector<Gemm> muon_step_gemms(const std::vector<MatrixSpec>& specs);

double total_flops(const std::vector<Gemm>& gemms);

// The closed forms of the two counts, checked against the GEMM lists (a mismatch is a bug
// here, not a measurement).
void check_flop_counts(const std::vector<MatrixSpec>& specs);

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
