// One optimizer step on one GPT-2-small-shaped transformer layer, for every optimizer pion
// offers, plus the machine's sgemm rate measured in the same run (the GEMM roofline of the
// Pion step is its flop count over that rate). scripts/bench-optim.sh runs this beside
// bench/torch_optim.py (PyTorch doing the same math) and prints the side-by-side table.
//
// The layer: four 768 x 768 (q, k, v, o), two 2048 x 768 (MLP up and gate) and one
// 768 x 2048 (MLP down) matrices, shape d_out x d_in, random non-zero weights and gradients.
// Every optimizer gets its own copy of the same weights and gradients. Each workload is
// built once and stepped twice before timing (the first Pion step takes an fp64 SVD and
// allocates state and scratch; neither belongs in a steady-state step), then every
// repetition times steps in wall-clock time (BLAS and OpenMP threads run beside the
// caller, so CPU time would overstate the cost). The median of the repetitions is the
// figure to read.
//
// Extra flag: --reps=N (default 5) sets the repetitions; every --benchmark_* flag works.
#include <benchmark/benchmark.h>

#include <cstdint>
#include <cstdlib>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "pion/core/linalg.h"
#include "pion/core/random.h"
#include "pion/core/tensor.h"
#include "pion/optim/adamw.h"
#include "pion/optim/muon.h"
#include "pion/optim/optimizer.h"
#include "pion/optim/pion.h"

namespace {

using pion::Tensor;

struct MatrixShape {
  const char* name;
  std::int64_t d_out, d_in;
};

// GPT-2 small, one layer (d = 768, MLP hidden 2048 as in a LLaMA-style SwiGLU block of
// the same width: up and gate 2048 x 768, down 768 x 2048).
const std::vector<MatrixShape>& layer_shapes() {
  static const std::vector<MatrixShape> shapes = {
      {"attn.q", 768, 768},  {"attn.k", 768, 768},    {"attn.v", 768, 768},   {"attn.o", 768, 768},
      {"mlp.up", 2048, 768}, {"mlp.gate", 2048, 768}, {"mlp.down", 768, 2048}};
  return shapes;
}

// Learning rates and hyperparameters of a realistic run (the trainer's defaults: matrix
// lr 0.02 for Muon and Pion, 1e-3 for AdamW). The step cost of exp depends on ||sA||, so
// the lr is not arbitrary there; for the others it only changes the numbers, not the work.
constexpr double kMatrixLr = 0.02;
constexpr double kAdamLr = 1e-3;

// The layer's weights and gradients (own storage) and the optimizer that updates them.
struct Workload {
  std::vector<Tensor> values, grads;
  std::unique_ptr<pion::Optimizer> optimizer;
};

std::vector<pion::Param> make_params(Workload& w) {
  pion::Rng rng(2026);
  std::vector<pion::Param> params;
  for (const MatrixShape& s : layer_shapes()) {
    Tensor value = Tensor::empty({s.d_out, s.d_in});
    Tensor grad = Tensor::empty({s.d_out, s.d_in});
    pion::fill_normal(value, rng, 0.0, 0.02);  // GPT-2's init scale
    pion::fill_normal(grad, rng, 0.0, 1e-3);
    w.values.push_back(value);
    w.grads.push_back(grad);
    params.push_back({s.name, value, grad});
  }
  return params;
}

std::unique_ptr<Workload> make_workload(const std::string& which) {
  auto w = std::make_unique<Workload>();
  std::vector<pion::Param> params = make_params(*w);
  if (which == "adamw") {
    auto opt = std::make_unique<pion::AdamW>();
    opt->add_param_group(std::move(params), kAdamLr, pion::AdamW::Options{});
    w->optimizer = std::move(opt);
  } else if (which == "muon") {
    auto opt = std::make_unique<pion::Muon>();
    opt->add_param_group(std::move(params), kMatrixLr, pion::Muon::Options{});
    w->optimizer = std::move(opt);
  } else {
    pion::Pion::Options o;
    o.retraction = pion::parse_retraction(which.substr(std::string("pion_").size()));
    auto opt = std::make_unique<pion::Pion>();
    opt->add_param_group(std::move(params), kMatrixLr, o);
    w->optimizer = std::move(opt);
  }
  // Warm-up: state allocation, Pion's sigma0 SVD, BLAS thread start-up.
  for (int i = 0; i < 2; ++i) w->optimizer->step();
  return w;
}

// Workloads survive across repetitions (built and warmed up once, outside any timing).
Workload& workload(const std::string& which) {
  static std::map<std::string, std::unique_ptr<Workload>> cache;
  auto it = cache.find(which);
  if (it == cache.end()) it = cache.emplace(which, make_workload(which)).first;
  return *it->second;
}

void step_benchmark(benchmark::State& state, const std::string& which) {
  Workload& w = workload(which);
  for (auto _ : state) {
    // step_unchecked: the finite check is a full read of every gradient that PyTorch's
    // optimizers do not do either; step() would add it.
    w.optimizer->step_unchecked();
    benchmark::ClobberMemory();
  }
}

// C = A B with A (m x k), B (k x n): the rate of the BLAS both sides use.
void sgemm_benchmark(benchmark::State& state, std::int64_t m, std::int64_t n, std::int64_t k) {
  pion::Rng rng(7);
  Tensor a = Tensor::empty({m, k}), b = Tensor::empty({k, n}), c = Tensor::empty({m, n});
  pion::fill_normal(a, rng);
  pion::fill_normal(b, rng);
  pion::gemm<float>(pion::Trans::N, pion::Trans::N, m, n, k, 1.0f, a.data<float>(), k,
                    b.data<float>(), n, 0.0f, c.data<float>(), n);  // warm-up
  for (auto _ : state) {
    pion::gemm<float>(pion::Trans::N, pion::Trans::N, m, n, k, 1.0f, a.data<float>(), k,
                      b.data<float>(), n, 0.0f, c.data<float>(), n);
    benchmark::ClobberMemory();
  }
  state.counters["flops"] =
      2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k);
}

// The GEMM flops of one Pion taylor2 step on the layer, as the spec counts them:
// 8 m n^2 + 6 m^2 n per m x n matrix (m = d_out, n = d_in).
double pion_step_flops() {
  double total = 0.0;
  for (const MatrixShape& s : layer_shapes()) {
    const auto m = static_cast<double>(s.d_out), n = static_cast<double>(s.d_in);
    total += 8 * m * n * n + 6 * m * m * n;
  }
  return total;
}

// The GEMM flops of one Muon step: ns_steps (5) Newton-Schulz iterations on the wide
// orientation r x c (r <= c): X X^T (2 r^2 c), A A (2 r^3), B X (2 r^2 c).
double muon_step_flops() {
  double total = 0.0;
  for (const MatrixShape& s : layer_shapes()) {
    const auto r = static_cast<double>(std::min(s.d_out, s.d_in));
    const auto c = static_cast<double>(std::max(s.d_out, s.d_in));
    total += 5 * (4 * r * r * c + 2 * r * r * r);
  }
  return total;
}

int parse_reps(int& argc, char** argv) {
  int reps = 5;
  int out = 1;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg.rfind("--reps=", 0) == 0) {
      reps = std::max(1, std::atoi(arg.c_str() + 7));
    } else {
      argv[out++] = argv[i];
    }
  }
  argc = out;
  return reps;
}

}  // namespace

int main(int argc, char** argv) {
  const int reps = parse_reps(argc, argv);
  // The roofline reference first, so it sees the same (idle or busy) machine as the steps.
  const struct {
    std::int64_t m, n, k;
  } gemms[] = {{2048, 2048, 2048}, {768, 768, 768}, {2048, 768, 768}, {768, 768, 2048}};
  for (const auto& g : gemms) {
    const std::string name =
        "sgemm/" + std::to_string(g.m) + "x" + std::to_string(g.n) + "x" + std::to_string(g.k);
    benchmark::RegisterBenchmark(name.c_str(), sgemm_benchmark, g.m, g.n, g.k)
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime()
        ->MinTime(0.3)
        ->Repetitions(reps)
        ->DisplayAggregatesOnly(true);
  }
  for (const std::string which : {"pion_taylor2", "pion_cayley", "pion_exp", "muon", "adamw"}) {
    auto* b = benchmark::RegisterBenchmark(("step/" + which).c_str(), step_benchmark, which)
                  ->Unit(benchmark::kMillisecond)
                  ->UseRealTime()
                  ->Repetitions(reps)
                  ->DisplayAggregatesOnly(true);
    // The matrix optimizers take most of a second per step: one step per repetition.
    if (which != "adamw") b->Iterations(1);
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::AddCustomContext("pion_step_flops", std::to_string(pion_step_flops()));
  benchmark::AddCustomContext("muon_step_flops", std::to_string(muon_step_flops()));
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
