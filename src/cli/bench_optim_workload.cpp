// The optimizer-step workload (src/cli/bench_optim_workload.h): what a step computes. The
// matrices of the model, their initial values, the GEMMs the Pion and Muon steps issue with
// the flop counts the tables' rates and roofline percentages are taken from, and the CPU
// optimizers.
#include "cli/bench_optim_workload.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "pion/core/error.h"
#include "pion/core/random.h"
#include "pion/core/tensor.h"
#include "pion/optim/adamw.h"
#include "pion/optim/muon.h"
#include "pion/optim/pion.h"

namespace pion::cli::bench_optim {

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

std::map<std::pair<std::int64_t, std::int64_t>, std::int64_t> shape_counts(
    const std::vector<MatrixSpec>& specs) {
  std::map<std::pair<std::int64_t, std::int64_t>, std::int64_t> out;
  for (const MatrixSpec& s : specs) ++out[{s.rows, s.cols}];
  return out;
}

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

std::string layer_shapes_text(const std::vector<MatrixSpec>& specs, int layers) {
  std::vector<std::pair<std::pair<std::int64_t, std::int64_t>, std::int64_t>> seen;
  for (const MatrixSpec& s : specs) {
    const auto shape = std::make_pair(s.rows, s.cols);
    auto it =
        std::find_if(seen.begin(), seen.end(), [&](const auto& e) { return e.first == shape; });
    if (it == seen.end())
      seen.push_back({shape, 1});
    else
      ++it->second;
  }
  std::string out;
  for (const auto& [shape, count] : seen) {
    if (!out.empty()) out += ", ";
    out += std::to_string(count / std::max(layers, 1)) + " x " + std::to_string(shape.first) + "x" +
           std::to_string(shape.second);
  }
  return out;
}

std::string normal_text(double std) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "N(0, %g^2)", std);
  return buf;
}

double learning_rate(const std::string& kind) {
  return kind == "adamw" ? kAdamLr : kMatrixLr;
}

std::unique_ptr<Optimizer> make_cpu_optimizer(const std::string& kind, std::vector<Param> params,
                                              PionRetraction retraction) {
  const double lr = learning_rate(kind);
  if (kind == "pion") {
    Pion::Options o;
    o.retraction = retraction;
    auto p = std::make_unique<Pion>();
    p->add_param_group(std::move(params), lr, o);
    return p;
  }
  if (kind == "muon") {
    auto m = std::make_unique<Muon>();
    m->add_param_group(std::move(params), lr, Muon::Options{});
    return m;
  }
  check(kind == "adamw", "bench optim: internal error: unknown optimizer '" + kind + "'");
  auto w = std::make_unique<AdamW>();
  w->add_param_group(std::move(params), lr, AdamW::Options{});
  return w;
}

std::vector<Param> copy_params(const HostMatrices& h) {
  std::vector<Param> params;
  for (std::size_t i = 0; i < h.specs.size(); ++i)
    params.push_back({h.specs[i].name, h.weights[i].clone(), h.grads[i]});
  return params;
}

}  // namespace pion::cli::bench_optim
