#pragma once
// `pion bench optim --pion_variants` (CPU): one step of every Pion variant (momentum x
// update_side x normalizer, issue 11) over the bench's matrices, beside AdamW, with each
// optimizer's own state bytes. The questions it answers: does a one-sided or alternating step
// cost <= 0.6x of a two-sided one, and do ambient/transported moments take <= AdamW's bytes?
// sigma0 (min(d_out, d_in) floats per matrix, kept by every variant for drift reporting) is
// listed apart from the moments so that comparison is visible.
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "cli/bench_optim.h"
#include "pion/optim/options.h"

namespace pion::cli::bench_optim {

struct VariantResult {
  std::string label;  // "lie / left / adam"; "AdamW" for the baseline row
  bool is_adamw = false;
  PionOptions options;           // Pion rows
  std::vector<double> times_ms;  // one per timed step
  double moment_bytes = 0.0;     // state_bytes() after the run, less sigma0
  double sigma0_bytes = 0.0;
};

struct VariantReport {
  std::string hardware, date, timing;
  int layers = 0, steps = 0, warmup = 0;
  std::vector<MatrixSpec> specs;
  std::vector<VariantResult> rows;  // AdamW first, then the Pion variants
  double wall_s = 0.0;
};

// Every valid PionOptions combination (msign needs lie momentum), the default first.
std::vector<PionOptions> pion_variants();
std::string variant_label(const PionOptions& o);

void run_cpu_variants(const OptimBenchArgs& a, VariantReport& r);
void print_variant_report(const VariantReport& r);
nlohmann::json variant_report_json(const VariantReport& r);

}  // namespace pion::cli::bench_optim
