// `pion bench`: benchmarks built into the binary, one sub-subcommand each, registered in
// add_bench_command at the end of this file.
//
//   pion bench optim   one optimizer step over the hidden matrices of a GPT-2-small-shaped
//                      LLaMA (CPU or GPU), beside the machine's GEMM roofline measured in the
//                      same run; Pion's spectrum drift on the GPU (fp32 and mixed).
//
// The PyTorch peer of `pion bench optim --device cuda` is bench/torch_optim.py --device cuda;
// scripts/gpu-bench.sh runs both and prints the ratios (bench/compare_optim.py).
#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <ctime>
#include <exception>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "cli/bench_train.h"
#include "cli/commands.h"
#include "pion/core/device.h"
#include "pion/core/error.h"
#include "pion/core/linalg.h"
#include "pion/core/random.h"
#include "pion/core/tensor.h"
#include "pion/optim/adamw.h"
#include "pion/optim/muon.h"
#include "pion/optim/optimizer.h"
#include "pion/optim/pion.h"
#ifdef PION_HAVE_CUDA
#include "pion/cuda/bench.h"
#include "pion/cuda/optim.h"
#include "pion/cuda/runtime.h"
#endif

namespace pion::cli {

namespace {

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
std::vector<MatrixSpec> gpt2_small_matrices(int layers) {
  std::vector<MatrixSpec> out;
  for (int l = 0; l < layers; ++l) {
    const std::string p = "layers." + std::to_string(l) + ".";
    for (const char* w : {"attn.wq", "attn.wk", "attn.wv", "attn.wo"})
      out.push_back({p + w, 768, 768});
    out.push_back({p + "mlp.w_gate", 2048, 768});
    out.push_back({p + "mlp.w_up", 2048, 768});
    out.push_back({p + "mlp.w_down", 768, 2048});
  }
  return out;
}

// Matrices of each shape, in shape order (how the GPU optimizers batch them).
std::map<std::pair<std::int64_t, std::int64_t>, std::int64_t> shape_counts(
    const std::vector<MatrixSpec>& specs) {
  std::map<std::pair<std::int64_t, std::int64_t>, std::int64_t> out;
  for (const MatrixSpec& s : specs) ++out[{s.rows, s.cols}];
  return out;
}

// Weights N(0, 0.02^2) and gradients N(0, 1e-3^2), one RNG stream per matrix (so the
// values do not depend on the thread count).
struct HostMatrices {
  std::vector<MatrixSpec> specs;
  std::vector<Tensor> weights, grads;
};

HostMatrices make_host_matrices(int layers) {
  HostMatrices h;
  h.specs = gpt2_small_matrices(layers);
  const auto n = static_cast<std::int64_t>(h.specs.size());
  for (const MatrixSpec& s : h.specs) {
    h.weights.push_back(Tensor::empty({s.rows, s.cols}));
    h.grads.push_back(Tensor::empty({s.rows, s.cols}));
  }
#pragma omp parallel for schedule(dynamic, 1)
  for (std::int64_t i = 0; i < n; ++i) {
    const auto idx = static_cast<std::size_t>(i);
    Rng rng(2026u * 1000u + static_cast<std::uint64_t>(i));
    fill_normal(h.weights[idx], rng, 0.0, kWeightStd);
    fill_normal(h.grads[idx], rng, 0.0, kGradStd);
  }
  return h;
}

std::int64_t parameter_count(const std::vector<MatrixSpec>& specs) {
  std::int64_t n = 0;
  for (const MatrixSpec& s : specs) n += s.rows * s.cols;
  return n;
}

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

// Pion's taylor2 step (cuda/optim/pion_cuda.cu, src/optim/pion.cpp) per shape group of B
// d_out x d_in matrices (m = d_out, n = d_in): X_in = W^T g, X_out = g W^T, P = A_out W,
// Q = W A_in, then E2 applied left first when m >= n (A_out P, LW A_in, R A_in) or right
// first otherwise. In all 8 m n^2 + 6 m^2 n flops per matrix when m >= n (mirrored when
// m < n), as include/pion/optim/pion.h counts them.
std::vector<Gemm> pion_step_gemms(const std::vector<MatrixSpec>& specs) {
  std::vector<Gemm> out;
  for (const auto& [shape, b] : shape_counts(specs)) {
    const auto [m, n] = shape;
    out.push_back({n, n, m, b, true, false});
    out.push_back({m, m, n, b, false, true});
    out.push_back({m, n, m, b});
    out.push_back({m, n, n, b});
    if (m >= n) {
      out.push_back({m, n, m, b});
      out.push_back({m, n, n, b});
      out.push_back({m, n, n, b});
    } else {
      out.push_back({m, n, n, b});
      out.push_back({m, n, m, b});
      out.push_back({m, n, m, b});
    }
  }
  return out;
}

// Muon's Newton-Schulz (cuda/optim/muon_cuda.cu) per shape group, r = min(rows, cols):
// ns_steps x (Gram matrix r x r, B = b A + c A A, X' = a X + B X): 4 r^2 c + 2 r^3 flops per
// iteration and matrix (c = max(rows, cols)).
std::vector<Gemm> muon_step_gemms(const std::vector<MatrixSpec>& specs) {
  std::vector<Gemm> out;
  for (const auto& [shape, b] : shape_counts(specs)) {
    const auto [rows, cols] = shape;
    const std::int64_t r = std::min(rows, cols);
    const bool tall = rows > cols;
    for (int it = 0; it < kMuonNsSteps; ++it) {
      out.push_back(tall ? Gemm{r, r, rows, b, true, false} : Gemm{r, r, cols, b, false, true});
      out.push_back({r, r, r, b});
      out.push_back(tall ? Gemm{rows, cols, cols, b, false, true} : Gemm{rows, cols, rows, b});
    }
  }
  return out;
}

double total_flops(const std::vector<Gemm>& gemms) {
  double f = 0.0;
  for (const Gemm& g : gemms) f += g.flops();
  return f;
}

// The closed forms of the two counts, checked against the GEMM lists (a mismatch is a bug
// here, not a measurement).
void check_flop_counts(const std::vector<MatrixSpec>& specs) {
  double pion = 0.0, muon = 0.0;
  for (const MatrixSpec& s : specs) {
    const auto big = static_cast<double>(std::max(s.rows, s.cols));
    const auto small = static_cast<double>(std::min(s.rows, s.cols));
    pion += 8 * big * small * small + 6 * big * big * small;
    muon += kMuonNsSteps * (4 * small * small * big + 2 * small * small * small);
  }
  const auto close = [](double a, double b) { return std::abs(a - b) <= 1e-9 * std::abs(b); };
  check(close(total_flops(pion_step_gemms(specs)), pion) &&
            close(total_flops(muon_step_gemms(specs)), muon),
        "bench optim: internal error: GEMM lists disagree with the flop formulas");
}

struct Stats {
  double median = 0.0, min = 0.0, max = 0.0;
};

Stats stats_of(std::vector<double> v) {
  check(!v.empty(), "bench optim: internal error: no timings");
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  const double median = n % 2 == 1 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
  return {median, v.front(), v.back()};
}

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

std::string fmt(const char* format, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, format, v);
  return buf;
}

// Milliseconds with 3 significant digits or more.
std::string fmt_ms(double ms) {
  return fmt(ms >= 100 ? "%.1f" : ms >= 10 ? "%.2f" : ms >= 1 ? "%.3f" : "%.4f", ms);
}

std::string shape_text(const Gemm& g) {
  std::string s = std::to_string(g.m) + "x" + std::to_string(g.n) + "x" + std::to_string(g.k);
  if (g.trans_a) s += " (A^T)";
  if (g.trans_b) s += " (B^T)";
  return s;
}

// ---- the report: Markdown on stdout, JSON to --json ------------------------------------

std::string pct(double roofline_ms, double measured_ms) {
  return fmt("%.0f%%", 100.0 * roofline_ms / measured_ms);
}

void print_report(const Report& r) {
  const std::int64_t params = parameter_count(r.specs);
  std::cout << "## pion bench optim --device " << r.device << "\n\n";
  std::cout << "| | |\n|---|---|\n";
  std::cout << "| " << (r.device == "cuda" ? "GPU" : "CPU") << " | " << r.hardware << " |\n";
  std::cout << "| date | " << r.date << " |\n";
  std::cout << "| matrices | " << r.layers << (r.layers == 1 ? " layer" : " layers")
            << " x (4 x 768x768, 2 x 2048x768, 1 x "
            << "768x2048) = " << r.specs.size() << " matrices, " << fmt("%.1f", params / 1e6)
            << "M parameters, fp32 |\n";
  std::cout << "| inputs | weights N(0, 0.02^2), gradients N(0, 1e-3^2) (fixed, never zero); "
               "lr 0.02 (Pion, Muon), 1e-3 (AdamW) |\n";
  std::cout << "| timing | " << r.timing << " |\n\n";

  const auto rate_of = [&](const std::string& precision) {
    auto it = r.rate.find(precision);
    return it == r.rate.end() ? 0.0 : it->second;
  };
  const std::string drift_head =
      r.drift_steps > 0 && r.device == "cuda"
          ? "spectrum drift after " + std::to_string(r.drift_steps) + " steps"
          : "spectrum drift";
  std::cout << "| optimizer | GEMMs | median ms | min–max ms | GEMM GFLOP/step | TFLOP/s | % of "
               "fp32 roofline | % of own-precision roofline | % of its GEMMs alone | "
            << drift_head << " |\n";
  std::cout << "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n";
  for (const Result& x : r.results) {
    if (!x.error.empty()) {
      std::cout << "| " << x.label << " | " << (x.gemm.empty() ? "—" : x.gemm)
                << " | failed: " << x.error << " | | | | | | | |\n";
      continue;
    }
    const Stats s = stats_of(x.times_ms);
    std::string gflop = "—", tflops = "—", roof32 = "—", roof_own = "—", alone = "—";
    if (x.gemm_flops > 0) {
      gflop = fmt("%.1f", x.gemm_flops / 1e9);
      tflops = fmt("%.3g", x.gemm_flops / (s.median * 1e-3) / 1e12);
      const double fp32 = rate_of("fp32");
      if (fp32 > 0) roof32 = pct(x.gemm_flops / fp32 * 1e3, s.median);
      const double own = rate_of(x.gemm);
      if (own > 0) roof_own = pct(x.gemm_flops / own * 1e3, s.median);
      if (x.gemms_alone_ms > 0) alone = pct(x.gemms_alone_ms, s.median);
    } else if (x.bytes > 0) {
      tflops = fmt("%.0f GB/s", x.bytes / (s.median * 1e-3) / 1e9);
    }
    std::string drift = x.has_drift ? fmt("%.2e", x.drift) : "—";
    if (!x.drift_error.empty()) drift = "failed: " + x.drift_error;
    const std::string label =
        x.label + (x.timing.rfind("eager", 0) == 0 ? " (eager steps: graph capture failed)" : "");
    std::cout << "| " << label << " | " << (x.gemm.empty() ? "—" : x.gemm) << " | "
              << fmt_ms(s.median) << " | " << fmt_ms(s.min) << "–" << fmt_ms(s.max) << " | "
              << gflop << " | " << tflops << " | " << roof32 << " | " << roof_own << " | " << alone
              << " | " << drift << " |\n";
  }

  std::cout << "\nRoofline: " << r.roofline_gemm << " GEMM in this run:";
  bool first = true;
  for (const auto& [precision, s] : r.peak) {
    const double rate = rate_of(precision);
    std::cout << (first ? " " : ", ") << precision << " " << fmt_ms(s.median) << " ms = "
              << (rate >= 1e12 ? fmt("%.1f TFLOP/s", rate / 1e12)
                               : fmt("%.1f GFLOP/s", rate / 1e9));
    first = false;
  }
  std::cout << (r.device == "cuda"
                    ? " (cuBLAS: fp32 = CUBLAS_COMPUTE_32F, no TF32; tf32 = "
                      "CUBLAS_COMPUTE_32F_FAST_TF32; bf16 = bf16 in/out, fp32 accumulate)."
                    : " (pion::gemm, OpenBLAS sgemm).")
            << " % of roofline = (GEMM flops / roofline rate) / measured step time; own "
               "precision = the optimizer's GEMM precision. GEMM flops: Pion sum of 8 m n^2 + 6 "
               "m^2 n (m = larger side, n = smaller), Muon 5 x (4 r^2 c + 2 r^3) (r <= c); "
               "AdamW has no GEMMs (memory-bound; its column shows GB/s at 28 bytes per "
               "parameter).";
  if (r.device == "cuda")
    std::cout << " \"% of its GEMMs alone\" = the step's own batched cuBLAS calls (same "
                 "shapes, batches, transposes and precision), each timed alone, summed, over "
                 "the measured step: what the rest of the step costs.";
  std::cout << "\n";
  if (r.drift_steps > 0 && r.device == "cuda")
    std::cout << "\nSpectrum drift: fresh weights, " << r.drift_steps
              << " steps (one eager, then CUDA-graph replays) at lr " << r.drift_lr
              << " with the fixed gradients, then max over the " << r.specs.size()
              << " matrices of max_i |sigma_i - sigma0_i| / max_i sigma0_i (fp64 SVD on the "
                 "host). taylor2's own truncation drift is O((s ||A||)^4) per step in both "
                 "precisions; the difference between the rows is the TF32 rounding.\n";

  // Pion's GEMMs one by one, fp32 beside TF32 (every rate is in the JSON).
  std::vector<const GemmRate*> fp32_rows;
  std::map<decltype(Gemm{}.key()), const GemmRate*> tf32_of;
  for (const GemmRate& g : r.shape_rates) {
    if (g.owner != "pion") continue;
    if (g.precision == "fp32") fp32_rows.push_back(&g);
    if (g.precision == "tf32") tf32_of[g.gemm.key()] = &g;
  }
  if (!fp32_rows.empty()) {
    const auto tflops = [](const GemmRate& g) {
      return fmt("%.1f", g.gemm.flops() / (g.ms.median * 1e-3) / 1e12);
    };
    std::cout << "\n### cuBLAS rates of the batched GEMMs in Pion's step (each call alone)\n\n"
              << "| GEMM (m x n x k) | batch | fp32 ms | fp32 TFLOP/s | tf32 ms | tf32 TFLOP/s "
                 "|\n|---|---:|---:|---:|---:|---:|\n";
    for (const GemmRate* g : fp32_rows) {
      auto t = tf32_of.find(g->gemm.key());
      std::cout << "| " << shape_text(g->gemm) << " | " << g->gemm.batch << " | "
                << fmt_ms(g->ms.median) << " | " << tflops(*g) << " | "
                << (t != tf32_of.end() ? fmt_ms(t->second->ms.median) : "—") << " | "
                << (t != tf32_of.end() ? tflops(*t->second) : "—") << " |\n";
    }
  }
  for (const std::string& f : r.failures) std::cout << "\nFAILED: " << f << "\n";
  std::cout << "\nwall time of the benchmark: " << fmt("%.0f", r.wall_s) << " s\n";
}

nlohmann::json report_json(const Report& r) {
  using nlohmann::json;
  json j;
  j["tool"] = "pion bench optim";
  j["device"] = r.device;
  j["hardware"] = r.hardware;
  j["date"] = r.date;
  j["backends"] = backend_summary();
  j["layers"] = r.layers;
  j["matrices"] = r.specs.size();
  j["parameters"] = parameter_count(r.specs);
  json shapes = json::array();
  for (const auto& [shape, count] : shape_counts(r.specs))
    shapes.push_back({{"rows", shape.first}, {"cols", shape.second}, {"count", count}});
  j["shapes"] = shapes;
  j["weights"] = "N(0, 0.02^2)";
  j["gradients"] = "N(0, 1e-3^2), fixed";
  j["steps"] = r.steps;
  j["warmup"] = r.warmup;
  j["timing"] = r.timing;
  j["wall_s"] = r.wall_s;
  json roof = json::object();
  for (const auto& [precision, s] : r.peak)
    roof[precision] = {{"gemm", r.roofline_gemm},
                       {"median_ms", s.median},
                       {"min_ms", s.min},
                       {"max_ms", s.max},
                       {"tflops", r.rate.at(precision) / 1e12}};
  j["roofline"] = roof;
  json rates = json::array();
  for (const GemmRate& g : r.shape_rates)
    rates.push_back({{"owner", g.owner},
                     {"m", g.gemm.m},
                     {"n", g.gemm.n},
                     {"k", g.gemm.k},
                     {"batch", g.gemm.batch},
                     {"trans_a", g.gemm.trans_a},
                     {"trans_b", g.gemm.trans_b},
                     {"precision", g.precision},
                     {"median_ms", g.ms.median},
                     {"tflops", g.gemm.flops() / (g.ms.median * 1e-3) / 1e12}});
  j["gemm_rates"] = rates;
  if (r.device == "cuda") j["drift"] = {{"steps", r.drift_steps}, {"lr", r.drift_lr}};
  json opts = json::object();
  for (const Result& x : r.results) {
    if (!x.error.empty()) {
      opts[x.name] = {{"label", x.label}, {"gemm_precision", x.gemm}, {"error", x.error}};
      continue;
    }
    const Stats s = stats_of(x.times_ms);
    json o = {{"label", x.label},
              {"gemm_precision", x.gemm},
              {"lr", x.lr},
              {"median_ms", s.median},
              {"min_ms", s.min},
              {"max_ms", s.max},
              {"times_ms", x.times_ms},
              {"wall_ms_per_step", x.wall_ms_per_step},
              {"gemm_flops", x.gemm_flops}};
    if (!x.timing.empty()) o["timing"] = x.timing;
    if (x.gemm_flops > 0) {
      o["tflops"] = x.gemm_flops / (s.median * 1e-3) / 1e12;
      if (r.rate.count("fp32"))
        o["roofline_pct_fp32"] = 100.0 * x.gemm_flops / r.rate.at("fp32") * 1e3 / s.median;
      if (r.rate.count(x.gemm))
        o["roofline_pct_own"] = 100.0 * x.gemm_flops / r.rate.at(x.gemm) * 1e3 / s.median;
      if (x.gemms_alone_ms > 0) {
        o["gemms_alone_ms"] = x.gemms_alone_ms;
        o["gemms_alone_pct"] = 100.0 * x.gemms_alone_ms / s.median;
      }
    }
    if (x.bytes > 0) o["gbytes_per_s"] = x.bytes / (s.median * 1e-3) / 1e9;
    o["drift"] = x.has_drift ? json{{"max", x.drift},
                                    {"worst_matrix", x.drift_worst},
                                    {"steps", r.drift_steps},
                                    {"lr", r.drift_lr},
                                    {"wall_s", x.drift_wall_s}}
                             : json(nullptr);
    if (!x.drift_error.empty()) o["drift_error"] = x.drift_error;
    opts[x.name] = o;
  }
  j["optimizers"] = opts;
  j["failures"] = r.failures;
  return j;
}

void write_json(const std::string& path, const nlohmann::json& j) {
  const std::filesystem::path p(path);
  if (p.has_parent_path()) std::filesystem::create_directories(p.parent_path());
  std::ofstream out(path);
  check(out.good(), "bench optim: cannot write --json '" + path + "'");
  out << j.dump(2) << "\n";
  out.close();
  check(out.good(), "bench optim: writing --json '" + path + "' failed");
}

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// ---- CPU: the optimizer classes of pion/optim, wall-clock median ---------------------------

void run_cpu(const OptimBenchArgs& a, Report& r) {
  r.hardware = cpu_model() + ", " + std::to_string(std::thread::hardware_concurrency()) +
               " logical CPUs, " + std::to_string(omp_get_max_threads()) + " OpenMP threads, " +
               std::to_string(openblas_get_num_threads()) + " OpenBLAS threads";
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
    const char* label;
    std::string gemm;
    double lr;
    double flops;
  };
  const Cpu runs[] = {{"pion_fp32", "Pion taylor2 fp32", "fp32", kMatrixLr, pion_flops},
                      {"muon_fp32", "Muon NS5 fp32", "fp32", kMatrixLr, muon_flops},
                      {"adamw", "AdamW", "", kAdamLr, 0.0}};
  for (const Cpu& c : runs) {
    std::vector<Param> params;
    for (std::size_t i = 0; i < h.specs.size(); ++i)
      params.push_back({h.specs[i].name, h.weights[i].clone(), h.grads[i]});
    std::unique_ptr<Optimizer> opt;
    const std::string name = c.name;
    if (name == "pion_fp32") {
      auto p = std::make_unique<Pion>();
      p->add_param_group(params, c.lr, Pion::Options{});
      opt = std::move(p);
    } else if (name == "muon_fp32") {
      auto m = std::make_unique<Muon>();
      m->add_param_group(params, c.lr, Muon::Options{});
      opt = std::move(m);
    } else {
      auto w = std::make_unique<AdamW>();
      w->add_param_group(params, c.lr, AdamW::Options{});
      opt = std::move(w);
    }
    for (int i = 0; i < a.warmup; ++i) opt->step();
    Result x;
    x.name = c.name;
    x.label = c.label;
    x.gemm = c.gemm;
    x.lr = c.lr;
    x.gemm_flops = c.flops;
    if (c.flops == 0) x.bytes = 28.0 * static_cast<double>(parameter_count(h.specs));
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

// ---- GPU: the CUDA optimizers, one step captured into a graph, CUDA-event timing ---------

#ifdef PION_HAVE_CUDA

// max over matrices of max_i |sigma_i(W) - sigma_i(W0)| / max_i sigma_i(W0), from fp64 SVDs
// run in parallel (one OpenBLAS thread each). Returns the drift and the worst matrix's name.
std::vector<std::vector<double>> spectra(const std::vector<Tensor>& mats) {
  std::vector<std::vector<double>> out(mats.size());
  const int blas_threads = openblas_get_num_threads();
  openblas_set_num_threads(1);
  std::exception_ptr error;
  const auto n = static_cast<std::int64_t>(mats.size());
#pragma omp parallel for schedule(dynamic, 1)
  for (std::int64_t i = 0; i < n; ++i) {
    try {
      const Tensor s = singular_values(mats[static_cast<std::size_t>(i)].to(DType::F64));
      out[static_cast<std::size_t>(i)].assign(s.span<double>().begin(), s.span<double>().end());
    } catch (...) {
#pragma omp critical
      if (!error) error = std::current_exception();
    }
  }
  openblas_set_num_threads(blas_threads);
  if (error) std::rethrow_exception(error);
  return out;
}

std::pair<double, std::string> max_drift(const std::vector<std::vector<double>>& sigma0,
                                         const std::vector<std::vector<double>>& sigma,
                                         const std::vector<MatrixSpec>& specs) {
  double worst = -1.0;
  std::string name;
  for (std::size_t i = 0; i < sigma0.size(); ++i) {
    double diff = 0.0, largest = 0.0;
    for (std::size_t j = 0; j < sigma0[i].size(); ++j) {
      diff = std::max(diff, std::abs(sigma[i][j] - sigma0[i][j]));
      largest = std::max(largest, sigma0[i][j]);
    }
    const double d = diff / largest;
    if (d > worst) {
      worst = d;
      name = specs[i].name;
    }
  }
  return {worst, name};
}

cuda::GemmShape to_cuda(const Gemm& g) {
  cuda::GemmShape s;
  s.m = g.m;
  s.n = g.n;
  s.k = g.k;
  s.batch = g.batch;
  s.trans_a = g.trans_a;
  s.trans_b = g.trans_b;
  return s;
}

// Times every distinct GEMM of the list once (median of 5 after 2), records the rates and
// returns the sum over the list: the step's GEMMs as if nothing else ran.
double time_step_gemms(cuda::Context& ctx, const std::string& owner, const std::vector<Gemm>& gemms,
                       const std::string& precision, Report& r) {
  std::map<decltype(gemms.front().key()), double> timed;
  double total = 0.0;
  try {
    for (const Gemm& g : gemms) {
      auto it = timed.find(g.key());
      if (it == timed.end()) {
        const Stats s = stats_of(cuda::time_gemm(ctx, to_cuda(g), precision, 2, 5));
        r.shape_rates.push_back({owner, g, precision, s});
        it = timed.emplace(g.key(), s.median).first;
      }
      total += it->second;
    }
  } catch (const std::exception& e) {
    r.failures.push_back(owner + " step GEMMs (" + precision + "): " + e.what());
    std::cerr << "bench optim: " << r.failures.back() << "\n";
    return 0.0;  // not measured
  }
  return total;
}

struct DeviceMatrices {
  std::vector<cuda::DeviceBuffer> weights, grads;

  explicit DeviceMatrices(const HostMatrices& h) {
    for (std::size_t i = 0; i < h.specs.size(); ++i) {
      const auto n = static_cast<std::size_t>(h.weights[i].numel());
      weights.emplace_back(n);
      grads.emplace_back(n);
      grads.back().upload(h.grads[i].data<float>(), n);
    }
    reset_weights(h);
  }
  // The device weights <- the host initial weights (each optimizer starts from the same W0).
  void reset_weights(const HostMatrices& h) {
    for (std::size_t i = 0; i < h.specs.size(); ++i)
      weights[i].upload(h.weights[i].data<float>(), weights[i].size());
  }
  std::vector<cuda::DeviceParam> params(const HostMatrices& h) {
    std::vector<cuda::DeviceParam> out;
    for (std::size_t i = 0; i < h.specs.size(); ++i)
      out.push_back(
          {h.specs[i].name, weights[i].data(), grads[i].data(), h.specs[i].rows, h.specs[i].cols});
    return out;
  }
  Tensor download(std::size_t i, const MatrixSpec& s) const {
    Tensor t = Tensor::empty({s.rows, s.cols});
    weights[i].download(t.data<float>(), static_cast<std::size_t>(t.numel()));
    return t;
  }
};

using MakeCuda = std::function<std::unique_ptr<cuda::CudaOptimizer>(
    cuda::Context&, std::vector<cuda::DeviceParam>)>;

// The weights moved, and stayed finite (a cheap check that the timed work was the real one).
void check_weights(const DeviceMatrices& d, const HostMatrices& h, const std::string& who) {
  for (std::size_t i : {std::size_t{0}, h.specs.size() - 1}) {
    const Tensor w = d.download(i, h.specs[i]);
    double moved = 0.0;
    const float* p = w.data<float>();
    const float* p0 = h.weights[i].data<float>();
    for (std::int64_t j = 0; j < w.numel(); ++j) {
      check(std::isfinite(p[j]),
            "bench optim: " + who + " left a non-finite weight in " + h.specs[i].name);
      moved = std::max(moved, static_cast<double>(std::abs(p[j] - p0[j])));
    }
    check(moved > 0.0, "bench optim: " + who + " did not change " + h.specs[i].name);
  }
}

// Captures one queue_step() at learning rate lr into the Context's graph. A capture that
// fails (a call inside it that a graph cannot hold) is discarded and reported through `how`
// and the return value: the caller then times eager steps instead, so the table still gets
// a figure and says how it was taken.
bool capture_step(cuda::Context& ctx, cuda::CudaOptimizer& opt, double lr, std::string& how) {
  opt.set_lr(lr);
  try {
    ctx.begin_capture();
    opt.queue_step();
    ctx.end_capture();
  } catch (const std::exception& e) {
    cuda::discard_capture(ctx);
    ctx.synchronize();
    how = std::string("eager: graph capture failed: ") + e.what();
    std::cerr << "bench optim: " << how << "\n";
    // The eager path takes the step the graph's untimed replay would have taken.
    opt.step(lr);
    return false;
  }
  how = "graph";
  return true;
}

// Eager steps timed back to back with CUDA events (host launch overhead included where the
// GPU runs out of queued work).
std::vector<double> time_eager_steps(cuda::Context& ctx, cuda::CudaOptimizer& opt, double lr,
                                     int steps) {
  cuda::EventTimer timer(ctx, static_cast<std::size_t>(steps));
  for (int i = 0; i < steps; ++i) {
    timer.start();
    opt.step(lr);
    timer.stop();
  }
  std::vector<double> out = timer.elapsed_ms();
  ctx.synchronize();
  return out;
}

void run_cuda(const OptimBenchArgs& a, Report& r) {
  r.hardware = cuda::device_description();
  r.timing = "median of " + std::to_string(a.steps) +
             " CUDA-graph replays of one captured step, timed back to back with CUDA events, "
             "after " +
             std::to_string(a.warmup) + " eager warm-up step(s) and 1 untimed replay";
  const auto t_setup = Clock::now();
  HostMatrices h = make_host_matrices(a.layers);
  r.specs = h.specs;
  cuda::Context ctx;
  DeviceMatrices d(h);
  std::cerr << "bench optim: " << h.specs.size() << " matrices on " << r.hardware << " ("
            << fmt("%.1f", seconds_since(t_setup)) << " s set-up)\n";

  // Rooflines: one large GEMM per precision, then the optimizers' own GEMMs.
  r.roofline_gemm = "4096^3";
  for (const std::string precision : {"fp32", "tf32", "bf16"}) {
    const Gemm big{4096, 4096, 4096, 1};
    try {
      r.peak[precision] = stats_of(cuda::time_gemm(ctx, to_cuda(big), precision, 3, 10));
      r.rate[precision] = big.flops() / (r.peak[precision].median * 1e-3);
    } catch (const std::exception& e) {
      r.failures.push_back(precision + " GEMM 4096^3: " + e.what());
      std::cerr << "bench optim: " << r.failures.back() << "\n";
    }
  }
  const std::vector<Gemm> pion_gemms = pion_step_gemms(h.specs);
  const std::vector<Gemm> muon_gemms = muon_step_gemms(h.specs);
  const double pion_alone_fp32 = time_step_gemms(ctx, "pion", pion_gemms, "fp32", r);
  const double pion_alone_tf32 = time_step_gemms(ctx, "pion", pion_gemms, "tf32", r);
  const double muon_alone_bf16 = time_step_gemms(ctx, "muon", muon_gemms, "bf16", r);
  const double muon_alone_fp32 = time_step_gemms(ctx, "muon", muon_gemms, "fp32", r);

  const auto pion_with = [](const std::string& precision) -> MakeCuda {
    return [precision](cuda::Context& c, std::vector<cuda::DeviceParam> p) {
      cuda::CudaPionOptions o;
      o.precision = precision;
      return cuda::make_cuda_pion(c, std::move(p), o);
    };
  };
  const auto muon_with = [](const std::string& precision) -> MakeCuda {
    return [precision](cuda::Context& c, std::vector<cuda::DeviceParam> p) {
      cuda::CudaMuonOptions o;
      o.precision = precision;
      return cuda::make_cuda_muon(c, std::move(p), o);
    };
  };
  const MakeCuda adamw = [](cuda::Context& c, std::vector<cuda::DeviceParam> p) {
    return cuda::make_cuda_adamw(c, std::move(p), cuda::CudaAdamWOptions{});
  };
  struct Gpu {
    const char* name;
    const char* label;
    std::string gemm;
    double lr;
    double flops;
    double alone_ms;
    MakeCuda make;
  };
  const double pion_flops = total_flops(pion_gemms), muon_flops = total_flops(muon_gemms);
  const std::vector<Gpu> runs = {{"pion_fp32", "Pion taylor2 fp32", "fp32", kMatrixLr, pion_flops,
                                  pion_alone_fp32, pion_with("fp32")},
                                 {"pion_mixed", "Pion taylor2 mixed (TF32 GEMMs)", "tf32",
                                  kMatrixLr, pion_flops, pion_alone_tf32, pion_with("mixed")},
                                 {"muon_bf16", "Muon NS5 bf16", "bf16", kMatrixLr, muon_flops,
                                  muon_alone_bf16, muon_with("bf16")},
                                 {"muon_fp32", "Muon NS5 fp32", "fp32", kMatrixLr, muon_flops,
                                  muon_alone_fp32, muon_with("fp32")},
                                 {"adamw", "AdamW", "", kAdamLr, 0.0, 0.0, adamw}};

  for (const Gpu& g : runs) {
    Result x;
    x.name = g.name;
    x.label = g.label;
    x.gemm = g.gemm;
    x.lr = g.lr;
    x.gemm_flops = g.flops;
    x.gemms_alone_ms = g.alone_ms;
    if (g.flops == 0) x.bytes = 28.0 * static_cast<double>(parameter_count(h.specs));
    try {
      d.reset_weights(h);
      std::unique_ptr<cuda::CudaOptimizer> opt = g.make(ctx, d.params(h));
      // Eager steps first: CUDA loads kernels lazily, and a capture must not be the first use.
      for (int i = 0; i < a.warmup; ++i) opt->step(g.lr);
      ctx.synchronize();
      const auto all = Clock::now();
      if (capture_step(ctx, *opt, g.lr, x.timing)) {
        x.times_ms = cuda::time_graph_replays(ctx, 1, a.steps);
      } else {
        x.times_ms = time_eager_steps(ctx, *opt, g.lr, a.steps);
      }
      x.wall_ms_per_step = 1e3 * seconds_since(all) / (a.steps + 1);
      const std::int64_t expected = a.warmup + 1 + a.steps;
      check(opt->steps() == expected && opt->skipped_steps() == 0,
            std::string(g.name) + " counted " + std::to_string(opt->steps()) + " steps and " +
                std::to_string(opt->skipped_steps()) + " skipped; expected " +
                std::to_string(expected) + " and 0");
      check_weights(d, h, g.name);
      std::cerr << "bench optim: " << x.label << ": " << fmt_ms(stats_of(x.times_ms).median)
                << " ms (" << x.timing << ")\n";
    } catch (const std::exception& e) {
      x.error = e.what();
      x.times_ms.clear();
      std::cerr << "bench optim: " << x.label << " failed: " << x.error << "\n";
    }
    r.results.push_back(std::move(x));
  }

  if (a.drift_steps > 0) {
    const auto t0 = Clock::now();
    const std::vector<std::vector<double>> sigma0 = spectra(h.weights);
    std::cerr << "bench optim: initial spectra (fp64 SVD of " << h.specs.size() << " matrices) in "
              << fmt("%.1f", seconds_since(t0)) << " s\n";
    for (Result& x : r.results) {
      if (x.name != "pion_fp32" && x.name != "pion_mixed") continue;
      try {
        const auto t1 = Clock::now();
        d.reset_weights(h);
        auto opt = pion_with(x.name == "pion_fp32" ? "fp32" : "mixed")(ctx, d.params(h));
        opt->step(a.drift_lr);
        ctx.synchronize();
        if (a.drift_steps > 1) {
          std::string how;
          const bool graph = capture_step(ctx, *opt, a.drift_lr, how);
          // A failed capture took one eager step in its place.
          for (int i = graph ? 1 : 2; i < a.drift_steps; ++i) {
            if (graph)
              ctx.launch_graph();
            else
              opt->step(a.drift_lr);
          }
        }
        ctx.synchronize();
        check(opt->steps() == a.drift_steps && opt->skipped_steps() == 0,
              "the drift run counted " + std::to_string(opt->steps()) + " steps and " +
                  std::to_string(opt->skipped_steps()) + " skipped; expected " +
                  std::to_string(a.drift_steps) + " and 0");
        std::vector<Tensor> final_weights;
        for (std::size_t i = 0; i < h.specs.size(); ++i)
          final_weights.push_back(d.download(i, h.specs[i]));
        const auto [drift, worst] = max_drift(sigma0, spectra(final_weights), h.specs);
        x.has_drift = true;
        x.drift = drift;
        x.drift_worst = worst;
        x.drift_wall_s = seconds_since(t1);
        std::cerr << "bench optim: " << x.label << ": drift after " << a.drift_steps << " steps "
                  << fmt("%.3e", drift) << " (" << worst << "), " << fmt("%.1f", x.drift_wall_s)
                  << " s\n";
      } catch (const std::exception& e) {
        x.drift_error = e.what();
        std::cerr << "bench optim: " << x.label << " drift run failed: " << x.drift_error << "\n";
      }
    }
  }
}

#endif  // PION_HAVE_CUDA

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

void add_bench_optim_command(CLI::App& bench) {
  auto* cmd = bench.add_subcommand(
      "optim",
      "one optimizer step over the hidden matrices of a GPT-2-small-shaped LLaMA, beside the "
      "GEMM roofline (Pion fp32/mixed, Muon, AdamW)");
  cmd->footer(
      "Matrices: per layer four 768x768, two 2048x768, one 768x2048 (d_out x d_in), fp32, "
      "weights N(0, 0.02^2), gradients N(0, 1e-3^2). cuda: the CUDA optimizers (Pion fp32 and "
      "mixed, Muon bf16 and fp32, AdamW), one step captured into a CUDA graph and its replays "
      "timed with CUDA events, cuBLAS GEMM rooflines (fp32 without TF32, TF32, bf16) and "
      "Pion's spectrum drift after --drift_steps steps. cpu: pion's CPU classes (Pion, Muon, "
      "AdamW), wall-clock median, OpenBLAS sgemm roofline. Prints a Markdown table; --json "
      "writes every figure (bench/compare_optim.py reads it).");
  auto args = std::make_shared<OptimBenchArgs>();
  cmd->add_option("--device", args->device, "cpu | cuda")
      ->check(CLI::IsMember({"cpu", "cuda"}))
      ->capture_default_str();
  cmd->add_option("--layers", args->layers, "transformer layers (7 matrices each)")
      ->check(CLI::Range(1, 96))
      ->capture_default_str();
  auto* steps = cmd->add_option("--steps", args->steps, "timed steps (default 20; 5 on cpu)")
                    ->check(CLI::Range(1, 100000));
  auto* warmup =
      cmd->add_option("--warmup", args->warmup, "untimed warm-up steps (default 3; 1 on cpu)")
          ->check(CLI::Range(0, 100000));
  cmd->add_option("--drift_steps", args->drift_steps,
                  "cuda: steps of Pion fp32 and mixed before the spectrum drift is measured (0: "
                  "skip)")
      ->check(CLI::Range(0, 1000000))
      ->capture_default_str();
  cmd->add_option("--drift_lr", args->drift_lr, "cuda: learning rate of the drift runs")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  cmd->add_option("--json", args->json, "also write the results to this JSON file");
  cmd->callback([args, steps, warmup] {
    OptimBenchArgs a = *args;
    if (a.device == "cpu") {
      if (steps->count() == 0) a.steps = 5;
      if (warmup->count() == 0) a.warmup = 1;
    }
    run_optim_bench(a);
  });
}

}  // namespace

void add_bench_command(CLI::App& app) {
  auto* bench = app.add_subcommand(
      "bench", "benchmarks: `pion bench optim --help`, `pion bench train --help`");
  bench->require_subcommand(1);
  add_bench_optim_command(*bench);
  add_bench_train_command(*bench);
}

}  // namespace pion::cli
