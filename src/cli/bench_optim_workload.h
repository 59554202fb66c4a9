#pragma once
// The workload of `pion bench optim` (src/cli/bench_optim.h) and of bench/bench_optim.cpp: the
// hidden matrices of a GPT-2-small-shaped LLaMA with their initial values, the GEMMs that
// the Pion and Muon steps issue with their flop counts, and the CPU optimizers that step
// them. Defined in bench_optim_workload.cpp; no CLI11, so the Google Benchmark program can
// compile it too.
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "pion/core/tensor.h"
#include "pion/optim/optimizer.h"
#include "pion/optim/options.h"

namespace pion::cli::bench_optim {

// The learning rates of a realistic run (the trainer's defaults: matrix_lr 0.02 for Muon and
// Pion, lr 1e-3 for AdamW). They change the numbers a step computes, not its work.
constexpr double kMatrixLr = 0.02;
constexpr double kAdamLr = 1e-3;
constexpr double kWeightStd = 0.02;  // GPT-2's init scale
constexpr double kGradStd = 1e-3;
inline const int kMuonNsSteps = MuonOptions{}.ns_steps;  // CudaMuonOptions's too
// AdamW's memory traffic per parameter and step: reads w, g, m, v and writes w, m, v (fp32).
constexpr double kAdamWBytesPerParam = 28.0;

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

// Weights N(0, kWeightStd^2) and gradients N(0, kGradStd^2), one RNG stream per matrix (so
// the values do not depend on the thread count).
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

// ---- what the reports say about the workload, built from the values above ----------------

// "4 x 768x768, 2 x 2048x768, 1 x 768x2048": the matrices of one layer, shapes in the order
// the model first names them (specs holds `layers` equal layers).
std::string layer_shapes_text(const std::vector<MatrixSpec>& specs, int layers);
// "N(0, 0.02^2)".
std::string normal_text(double std);

// ---- the CPU optimizers (pion/optim) that `pion bench optim --device cpu` and
// bench/bench_optim.cpp step ------------------------------------------------------------------

// "pion" (with `retraction`), "muon" or "adamw" with default options over params, at the run's
// learning rate (learning_rate(kind)). Throws pion::Error for another kind.
std::unique_ptr<Optimizer> make_cpu_optimizer(const std::string& kind, std::vector<Param> params,
                                              PionRetraction retraction = PionRetraction::Taylor2);
// kAdamLr for "adamw", kMatrixLr otherwise.
double learning_rate(const std::string& kind);
// The parameters over h: the gradients shared, the weights copied (each optimizer steps its
// own copy of the same weights).
std::vector<Param> copy_params(const HostMatrices& h);

}  // namespace pion::cli::bench_optim
