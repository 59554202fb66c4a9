// `pion bench optim --pion_variants` (src/cli/bench_optim_variants.h): the CPU run over every
// Pion variant and AdamW, and its Markdown table and JSON.
#include "cli/bench_optim_variants.h"

#include <iostream>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "pion/core/error.h"
#include "pion/optim/adamw.h"
#include "pion/optim/pion.h"

namespace pion::cli::bench_optim {

std::vector<PionOptions> pion_variants() {
  std::vector<PionOptions> out;
  for (int n = 0; n < kPionNormalizers.count; ++n)
    for (int m = 0; m < kPionMomenta.count; ++m)
      for (int s = 0; s < kPionUpdateSides.count; ++s) {
        PionOptions o;
        o.momentum = static_cast<PionMomentum>(m);
        o.update_side = static_cast<PionUpdateSide>(s);
        o.normalizer = static_cast<PionNormalizer>(n);
        if (o.normalizer == PionNormalizer::Msign && o.momentum != PionMomentum::Lie) continue;
        out.push_back(o);
      }
  return out;  // normalizer, then momentum, then side vary slowest to fastest: default first
}

std::string variant_label(const PionOptions& o) {
  return std::string(kPionMomenta.names[static_cast<int>(o.momentum)]) + " / " +
         kPionUpdateSides.names[static_cast<int>(o.update_side)] + " / " +
         kPionNormalizers.names[static_cast<int>(o.normalizer)];
}

namespace {

// Times a.steps steps after a.warmup untimed ones and reads the state the optimizer keeps.
void time_and_measure(Optimizer& opt, const OptimBenchArgs& a, const std::vector<MatrixSpec>& specs,
                      VariantResult& x) {
  for (int i = 0; i < a.warmup; ++i) opt.step();
  for (int i = 0; i < a.steps; ++i) {
    const auto t0 = Clock::now();
    opt.step_unchecked();
    x.times_ms.push_back(1e3 * seconds_since(t0));
  }
  check(opt.skipped_steps() == 0, "bench optim: " + x.label + " skipped a step");
  double sigma0 = 0.0;
  for (const MatrixSpec& s : specs) {
    const StateMap* st = opt.state(s.name);
    if (st == nullptr) continue;
    const auto it = st->find("sigma0");
    if (it != st->end()) sigma0 += static_cast<double>(it->second.nbytes());
  }
  x.sigma0_bytes = sigma0;
  x.moment_bytes = static_cast<double>(opt.state_bytes()) - sigma0;
  std::cerr << "bench optim: " << x.label << ": " << fmt_ms(stats_of(x.times_ms).median) << " ms\n";
}

// The median step of the two-sided row with o's momentum and normalizer.
double two_sided_ms(const VariantReport& r, const PionOptions& o) {
  for (const VariantResult& x : r.rows)
    if (!x.is_adamw && x.options.update_side == PionUpdateSide::Both &&
        x.options.momentum == o.momentum && x.options.normalizer == o.normalizer)
      return stats_of(x.times_ms).median;
  throw Error("bench optim: internal error: no two-sided row for " + variant_label(o));
}

std::string mib(double bytes) {
  return fmt("%.2f", bytes / (1 << 20));
}

}  // namespace

void run_cpu_variants(const OptimBenchArgs& a, VariantReport& r) {
  r.hardware = cpu_hardware_text();
  r.timing = "wall-clock median of " + std::to_string(a.steps) + " steps (step_unchecked) after " +
             std::to_string(a.warmup) +
             " warm-up step(s) (the first Pion step takes its sigma0 SVD); alternate rows mix "
             "left and right steps";
  r.layers = a.layers;
  r.steps = a.steps;
  r.warmup = a.warmup;
  const HostMatrices h = make_host_matrices(a.layers);
  r.specs = h.specs;
  {
    VariantResult x;
    x.label = "AdamW";
    x.is_adamw = true;
    AdamW opt;
    opt.add_param_group(copy_params(h), kAdamLr, AdamW::Options{});
    time_and_measure(opt, a, h.specs, x);
    r.rows.push_back(std::move(x));
  }
  for (const PionOptions& o : pion_variants()) {
    VariantResult x;
    x.label = variant_label(o);
    x.options = o;
    Pion opt;
    opt.add_param_group(copy_params(h), kMatrixLr, o);
    time_and_measure(opt, a, h.specs, x);
    r.rows.push_back(std::move(x));
  }
}

void print_variant_report(const VariantReport& r) {
  const std::int64_t params = parameter_count(r.specs);
  std::cout << "## pion bench optim --device cpu --pion_variants\n\n";
  std::cout << "| | |\n|---|---|\n";
  std::cout << "| CPU | " << r.hardware << " |\n";
  std::cout << "| date | " << r.date << " |\n";
  std::cout << "| matrices | " << r.layers << (r.layers == 1 ? " layer" : " layers") << " x ("
            << layer_shapes_text(r.specs, r.layers) << ") = " << r.specs.size() << " matrices, "
            << fmt("%.2f", params / 1e6) << "M parameters, fp32 |\n";
  std::cout << "| inputs | weights " << normal_text(kWeightStd) << ", gradients "
            << normal_text(kGradStd) << "; lr " << fmt("%g", kMatrixLr) << " (Pion), "
            << fmt("%g", kAdamLr) << " (AdamW); retraction taylor2 |\n";
  std::cout << "| timing | " << r.timing << " |\n\n";

  const VariantResult& adamw = r.rows.front();
  const double default_ms = two_sided_ms(r, PionOptions{});
  std::cout << "| optimizer (momentum / update_side / normalizer) | median ms | min–max ms | "
               "x default two-sided | x two-sided of its momentum | moment state MiB | "
               "x AdamW's state | + sigma0 MiB |\n";
  std::cout << "|---|---:|---:|---:|---:|---:|---:|---:|\n";
  for (const VariantResult& x : r.rows) {
    const Stats s = stats_of(x.times_ms);
    std::cout << "| " << x.label << " | " << fmt_ms(s.median) << " | " << fmt_ms(s.min) << "–"
              << fmt_ms(s.max) << " | ";
    if (x.is_adamw) {
      std::cout << "— | — | ";
    } else {
      std::cout << fmt("%.2f", s.median / default_ms) << " | "
                << fmt("%.2f", s.median / two_sided_ms(r, x.options)) << " | ";
    }
    std::cout << mib(x.moment_bytes) << " | " << fmt("%.2f", x.moment_bytes / adamw.moment_bytes)
              << " | " << (x.is_adamw ? "—" : mib(x.sigma0_bytes)) << " |\n";
  }
  std::cout << "\nmoment state: the optimizer's state_bytes() after the run less sigma0 (lie: "
               "m, v of the active sides' d x d generators, msign m only; ambient/transported: "
               "m, v of d_out x d_in; AdamW: m, v). sigma0 is min(d_out, d_in) floats per "
               "matrix, kept by every Pion variant for drift reporting. Wall "
            << fmt("%.1f", r.wall_s) << " s.\n";
}

nlohmann::json variant_report_json(const VariantReport& r) {
  using nlohmann::json;
  json j;
  j["tool"] = "pion bench optim --pion_variants";
  j["device"] = "cpu";
  j["hardware"] = r.hardware;
  j["date"] = r.date;
  j["layers"] = r.layers;
  j["matrices"] = r.specs.size();
  j["parameters"] = parameter_count(r.specs);
  j["steps"] = r.steps;
  j["warmup"] = r.warmup;
  j["timing"] = r.timing;
  j["wall_s"] = r.wall_s;
  const double default_ms = two_sided_ms(r, PionOptions{});
  json rows = json::array();
  for (const VariantResult& x : r.rows) {
    const Stats s = stats_of(x.times_ms);
    json row = {{"label", x.label},
                {"median_ms", s.median},
                {"min_ms", s.min},
                {"max_ms", s.max},
                {"times_ms", x.times_ms},
                {"moment_bytes", x.moment_bytes},
                {"sigma0_bytes", x.sigma0_bytes}};
    if (x.is_adamw) {
      row["optimizer"] = "adamw";
    } else {
      row["optimizer"] = "pion";
      row["momentum"] = kPionMomenta.names[static_cast<int>(x.options.momentum)];
      row["update_side"] = kPionUpdateSides.names[static_cast<int>(x.options.update_side)];
      row["normalizer"] = kPionNormalizers.names[static_cast<int>(x.options.normalizer)];
      row["ratio_to_default"] = s.median / default_ms;
      row["ratio_to_two_sided"] = s.median / two_sided_ms(r, x.options);
    }
    rows.push_back(row);
  }
  j["rows"] = rows;
  return j;
}

}  // namespace pion::cli::bench_optim
