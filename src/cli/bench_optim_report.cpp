// `pion bench optim` (src/cli/bench_optim.h): the report of a run, Markdown on stdout and
// JSON to --json, from the Report the CPU or GPU run filled. The optimizers' TFLOP/s, roofline
// percentages and GB/s are derived here, so both devices' tables and JSON agree on them.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "cli/bench_optim.h"
#include "pion/core/device.h"
#include "pion/core/error.h"
#include "pion/train/checkpoint.h"

namespace pion::cli::bench_optim {

Stats stats_of(std::vector<double> v) {
  check(!v.empty(), "bench optim: internal error: no timings");
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  const double median = n % 2 == 1 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
  return {median, v.front(), v.back()};
}

Result make_result(const std::string& name, const std::string& label, const std::string& gemm,
                   double lr, double gemm_flops, const std::vector<MatrixSpec>& specs) {
  Result x;
  x.name = name;
  x.label = label;
  x.gemm = gemm;
  x.lr = lr;
  x.gemm_flops = gemm_flops;
  if (gemm_flops == 0) x.bytes = kAdamWBytesPerParam * static_cast<double>(parameter_count(specs));
  return x;
}

std::string fmt(const char* format, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, format, v);
  return buf;
}

std::string fmt_ms(double ms) {
  return fmt(ms >= 100 ? "%.1f" : ms >= 10 ? "%.2f" : ms >= 1 ? "%.3f" : "%.4f", ms);
}

namespace {

std::string shape_text(const Gemm& g) {
  std::string s = std::to_string(g.m) + "x" + std::to_string(g.n) + "x" + std::to_string(g.k);
  if (g.trans_a) s += " (A^T)";
  if (g.trans_b) s += " (B^T)";
  return s;
}

std::string pct(double roofline_ms, double measured_ms) {
  return fmt("%.0f%%", 100.0 * roofline_ms / measured_ms);
}

// "lr 0.02 (Pion taylor2 fp32, Muon NS5 fp32), 0.001 (AdamW)": the rows by learning rate.
std::string learning_rates_text(const std::vector<Result>& results) {
  std::vector<std::pair<double, std::string>> by_lr;
  for (const Result& x : results) {
    auto it =
        std::find_if(by_lr.begin(), by_lr.end(), [&](const auto& e) { return e.first == x.lr; });
    if (it == by_lr.end())
      by_lr.push_back({x.lr, x.label});
    else
      it->second += ", " + x.label;
  }
  std::string out = "lr";
  for (const auto& [lr, labels] : by_lr)
    out += (out == "lr" ? " " : ", ") + fmt("%g", lr) + " (" + labels + ")";
  return out;
}

}  // namespace

void print_report(const Report& r) {
  const std::int64_t params = parameter_count(r.specs);
  std::cout << "## pion bench optim --device " << r.device << "\n\n";
  std::cout << "| | |\n|---|---|\n";
  std::cout << "| " << (r.device == "cuda" ? "GPU" : "CPU") << " | " << r.hardware << " |\n";
  std::cout << "| date | " << r.date << " |\n";
  std::cout << "| matrices | " << r.layers << (r.layers == 1 ? " layer" : " layers") << " x ("
            << layer_shapes_text(r.specs, r.layers) << ") = " << r.specs.size() << " matrices, "
            << fmt("%.1f", params / 1e6) << "M parameters, fp32 |\n";
  std::cout << "| inputs | weights " << normal_text(kWeightStd) << ", gradients "
            << normal_text(kGradStd) << " (fixed, never zero); " << learning_rates_text(r.results)
            << " |\n";
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
               "m^2 n (m = larger side, n = smaller), Muon "
            << kMuonNsSteps
            << " x (4 r^2 c + 2 r^3) (r <= c); AdamW has no GEMMs (memory-bound; its column "
               "shows GB/s at "
            << kAdamWBytesPerParam << " bytes per parameter).";
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
  j["weights"] = normal_text(kWeightStd);
  j["gradients"] = normal_text(kGradStd) + ", fixed";
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
  write_json_file(path, j);  // the project's atomic writer (temp file + rename)
}

}  // namespace pion::cli::bench_optim
