// `pion bench optim` (src/cli/bench_optim.h): the subcommand and its options, the run that
// checks the device, measures and reports, and the CPU measurement itself (pion's optimizer
// classes, wall-clock timing, the OpenBLAS sgemm roofline).
#include "cli/bench_optim.h"

#include <cblas.h>
#include <omp.h>

#include <cstdint>
#include <ctime>
#include <fstream>
#include <iostream>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "cli/bench_optim_variants.h"
#include "cli/validators.h"
#include "pion/core/error.h"
#include "pion/core/linalg.h"
#include "pion/core/random.h"
#include "pion/core/tensor.h"
#include "pion/optim/optimizer.h"
#ifdef PION_HAVE_CUDA
#include "pion/cuda/runtime.h"
#endif

namespace pion::cli {

namespace bench_optim {

namespace {

std::string utc_now() {
  const std::time_t t = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("model name", 0) == 0) {
      const auto colon = line.find(':');
      if (colon != std::string::npos) {
        const auto start = line.find_first_not_of(' ', colon + 1);
        return start == std::string::npos ? "?" : line.substr(start);
      }
    }
  }
  return "?";
}

}  // namespace

// ---- CPU: the optimizer classes of pion/optim, wall-clock median ---------------------------

std::string cpu_hardware_text() {
  return cpu_model() + ", " + std::to_string(std::thread::hardware_concurrency()) +
         " logical CPUs, " + std::to_string(omp_get_max_threads()) + " OpenMP threads, " +
         std::to_string(openblas_get_num_threads()) + " OpenBLAS threads";
}

void run_cpu(const OptimBenchArgs& a, Report& r) {
  r.hardware = cpu_hardware_text();
  r.timing = "wall-clock median of " + std::to_string(a.steps) + " steps (step_unchecked) after " +
             std::to_string(a.warmup) +
             " warm-up step(s) (the first Pion step takes its sigma0 SVD)";
  HostMatrices h = make_host_matrices(a.layers);
  r.specs = h.specs;

  // Roofline: sgemm 2048^3 through pion::gemm (OpenBLAS), median of 3 after one warm-up.
  {
    const std::int64_t n = 2048;
    Tensor x = Tensor::empty({n, n}), y = Tensor::empty({n, n}), z = Tensor::empty({n, n});
    Rng rng(7);
    fill_normal(x, rng);
    fill_normal(y, rng);
    std::vector<double> ms;
    for (int i = 0; i < 4; ++i) {
      const auto t0 = Clock::now();
      gemm<float>(Trans::N, Trans::N, n, n, n, 1.0f, x.data<float>(), n, y.data<float>(), n, 0.0f,
                  z.data<float>(), n);
      if (i > 0) ms.push_back(1e3 * seconds_since(t0));
    }
    r.roofline_gemm = "2048^3";
    r.peak["fp32"] = stats_of(ms);
    r.rate["fp32"] = 2.0 * n * n * n / (r.peak["fp32"].median * 1e-3);
  }

  const double pion_flops = total_flops(pion_step_gemms(h.specs));
  const double muon_flops = total_flops(muon_step_gemms(h.specs));
  struct Cpu {
    const char* name;
    const char* kind;  // make_cpu_optimizer's
    const char* label;
    std::string gemm;
    double flops;
  };
  const Cpu runs[] = {{"pion_fp32", "pion", "Pion taylor2 fp32", "fp32", pion_flops},
                      {"muon_fp32", "muon", "Muon NS5 fp32", "fp32", muon_flops},
                      {"adamw", "adamw", "AdamW", "", 0.0}};
  for (const Cpu& c : runs) {
    const std::string name = c.name;
    std::unique_ptr<Optimizer> opt = make_cpu_optimizer(c.kind, copy_params(h));
    for (int i = 0; i < a.warmup; ++i) opt->step();
    Result x = make_result(c.name, c.label, c.gemm, learning_rate(c.kind), c.flops, h.specs);
    const auto all = Clock::now();
    for (int i = 0; i < a.steps; ++i) {
      const auto t0 = Clock::now();
      opt->step_unchecked();
      x.times_ms.push_back(1e3 * seconds_since(t0));
    }
    x.wall_ms_per_step = 1e3 * seconds_since(all) / a.steps;
    check(opt->skipped_steps() == 0, "bench optim: " + name + " skipped a step");
    std::cerr << "bench optim: " << x.label << ": " << fmt_ms(stats_of(x.times_ms).median)
              << " ms\n";
    r.results.push_back(std::move(x));
  }
}

namespace {

void run_optim_bench(OptimBenchArgs a) {
  // The GPU checks come first: a clear error at once, before any set-up.
  if (a.device == "cuda") {
#ifndef PION_HAVE_CUDA
    throw Error(
        "bench optim --device cuda: this build has no CUDA back end (configured with "
        "PION_CUDA=OFF or without nvcc); rebuild with -DPION_CUDA=ON (scripts/gpu-check.sh, "
        "scripts/gpu-bench.sh) or use --device cpu");
#else
    if (cuda::device_count() == 0)
      throw Error(
          "bench optim --device cuda: no CUDA device is visible (cudaGetDeviceCount reports "
          "none); run on a machine with an NVIDIA GPU (scripts/gpu-bench.sh) or use --device "
          "cpu");
#endif
  }
  check_flop_counts(gpt2_small_matrices(1));
  const auto start = Clock::now();
  if (a.pion_variants) {
    VariantReport v;
    v.date = utc_now();
    run_cpu_variants(a, v);
    v.wall_s = seconds_since(start);
    print_variant_report(v);
    if (!a.json.empty()) {
      write_json(a.json, variant_report_json(v));
      std::cout << "wrote " << a.json << "\n";
    }
    return;
  }
  Report r;
  r.device = a.device;
  r.date = utc_now();
  r.layers = a.layers;
  r.steps = a.steps;
  r.warmup = a.warmup;
  r.drift_steps = a.drift_steps;
  r.drift_lr = a.drift_lr;
  if (a.device == "cpu") {
    run_cpu(a, r);
  } else {
#ifdef PION_HAVE_CUDA
    run_cuda(a, r);
#endif
  }
  r.wall_s = seconds_since(start);
  print_report(r);
  if (!a.json.empty()) {
    write_json(a.json, report_json(r));
    std::cout << "wrote " << a.json << "\n";
  }
  int failed = static_cast<int>(r.failures.size());
  for (const Result& x : r.results) failed += !x.error.empty() + !x.drift_error.empty();
  check(failed == 0, "bench optim: " + std::to_string(failed) +
                         " measurement(s) failed (see the table and stderr)");
}

}  // namespace

}  // namespace bench_optim

void add_bench_optim_command(CLI::App& bench) {
  auto* cmd = bench.add_subcommand(
      "optim",
      "one optimizer step over the hidden matrices of a GPT-2-small-shaped LLaMA, beside the "
      "GEMM roofline (Pion fp32/mixed, Muon, AdamW)");
  cmd->footer(
      "Matrices: per layer " +
      bench_optim::layer_shapes_text(bench_optim::gpt2_small_matrices(1), 1) +
      " (d_out x d_in), fp32, weights " + bench_optim::normal_text(bench_optim::kWeightStd) +
      ", gradients " + bench_optim::normal_text(bench_optim::kGradStd) +
      ". cuda: the CUDA optimizers (Pion fp32 and "
      "mixed, Muon bf16 and fp32, AdamW), one step captured into a CUDA graph and its replays "
      "timed with CUDA events, cuBLAS GEMM rooflines (fp32 without TF32, TF32, bf16) and "
      "Pion's spectrum drift after --drift_steps steps. cpu: pion's CPU classes (Pion, Muon, "
      "AdamW), wall-clock median, OpenBLAS sgemm roofline. Prints a Markdown table; --json "
      "writes every figure (bench/compare_optim.py reads it).");
  auto args = std::make_shared<bench_optim::OptimBenchArgs>();
  cmd->add_option("--device", args->device, "cpu | cuda")
      ->check(CLI::IsMember({"cpu", "cuda"}))
      ->capture_default_str();
  cmd->add_option("--layers", args->layers, "transformer layers (7 matrices each)")
      ->check(FiniteRange(1, 96))
      ->capture_default_str();
  auto* steps = cmd->add_option("--steps", args->steps, "timed steps (default 20; 5 on cpu)")
                    ->check(FiniteRange(1, 100000));
  auto* warmup =
      cmd->add_option("--warmup", args->warmup, "untimed warm-up steps (default 3; 1 on cpu)")
          ->check(FiniteRange(0, 100000));
  cmd->add_option("--drift_steps", args->drift_steps,
                  "cuda: steps of Pion fp32 and mixed before the spectrum drift is measured (0: "
                  "skip)")
      ->check(FiniteRange(0, 1000000))
      ->capture_default_str();
  cmd->add_option("--drift_lr", args->drift_lr, "cuda: learning rate of the drift runs")
      ->check(FiniteRange(0, 100, true))
      ->capture_default_str();
  auto* layers = cmd->get_option("--layers");
  cmd->add_flag("--pion_variants", args->pion_variants,
                "cpu: time every Pion variant (momentum x update_side x normalizer, taylor2) "
                "beside AdamW with each one's state bytes, on one layer unless --layers is given");
  cmd->add_option("--json", args->json, "also write the results to this JSON file");
  cmd->callback([args, steps, warmup, layers] {
    bench_optim::OptimBenchArgs a = *args;
    if (a.pion_variants && a.device != "cpu")
      throw Error("bench optim --pion_variants: CPU only so far; use --device cpu");
    if (a.device == "cpu") {
      if (steps->count() == 0) a.steps = 5;
      if (warmup->count() == 0) a.warmup = 1;
      // The question is about the GPT-2-small layer; 16 variants x 12 layers would
      // take a quarter of an hour on a laptop.
      if (a.pion_variants && layers->count() == 0) a.layers = 1;
    }
    bench_optim::run_optim_bench(a);
  });
}

}  // namespace pion::cli
