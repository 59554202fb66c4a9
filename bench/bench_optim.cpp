// One optimizer step on one GPT-2-small-shaped transformer layer, for every optimizer pion
// offers, plus the machine's sgemm rate measured in the same run (the GEMM roofline of the
// Pion step is its flop count over that rate). scripts/bench-optim.sh runs this beside
// bench/torch_optim.py (PyTorch doing the same math) and prints the side-by-side table.
//
// The workload is `pion bench optim`'s (src/cli/bench_optim_workload.h) at one layer: its
// matrices (four 768 x 768, two 2048 x 768 and one 768 x 2048, d_out x d_in), their random
// non-zero weights and gradients, its CPU optimizers, learning rates and flop counts. This
// program adds what Google Benchmark gives: the Pion retractions beside taylor2 and
// repetitions with their aggregates. Every optimizer gets its own copy of the same weights
// and gradients. Each workload is built once and stepped twice before timing (the first
// Pion step takes an fp64 SVD and allocates state and scratch; neither belongs in a
// steady-state step), then every repetition times steps in wall-clock time (BLAS and OpenMP
// threads run beside the caller, so CPU time would overstate the cost). The median of the
// repetitions is the figure to read.
//
// Extra flag: --reps=N (default 5) sets the repetitions; every --benchmark_* flag works.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "cli/bench_optim_workload.h"
#include "pion/core/linalg.h"
#include "pion/core/random.h"
#include "pion/core/tensor.h"
#include "pion/optim/optimizer.h"
#include "pion/optim/pion.h"

namespace {

namespace bo = pion::cli::bench_optim;
using pion::Tensor;

// One layer's weights and gradients (own storage) and the optimizer that updates them.
struct Workload {
  bo::HostMatrices matrices;
  std::unique_ptr<pion::Optimizer> optimizer;
};

// which: "pion_<retraction>", "muon" or "adamw".
std::unique_ptr<Workload> make_workload(const std::string& which) {
  auto w = std::make_unique<Workload>();
  w->matrices = bo::make_host_matrices(1);
  const bool is_pion = which.rfind("pion_", 0) == 0;
  w->optimizer = bo::make_cpu_optimizer(
      is_pion ? "pion" : which, bo::copy_params(w->matrices),
      is_pion ? pion::parse_retraction(which.substr(5)) : pion::PionRetraction::Taylor2);
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
  const std::vector<bo::MatrixSpec> layer = bo::gpt2_small_matrices(1);
  benchmark::AddCustomContext("pion_step_flops",
                              std::to_string(bo::total_flops(bo::pion_step_gemms(layer))));
  benchmark::AddCustomContext("muon_step_flops",
                              std::to_string(bo::total_flops(bo::muon_step_gemms(layer))));
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
