// `pion bench optim --device cuda` (src/cli/bench_optim.h): the CUDA optimizers, one step
// captured into a CUDA graph and its replays timed with CUDA events, beside cuBLAS GEMM
// rooflines and the step's own GEMMs timed alone; then Pion's spectrum drift over
// --drift_steps steps. The CMake glob compiles every src/cli/*.cpp: without the CUDA back
// end (PION_HAVE_CUDA undefined) this file compiles to nothing.
#ifdef PION_HAVE_CUDA

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <exception>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "cli/bench_optim.h"
#include "pion/core/error.h"
#include "pion/core/linalg.h"
#include "pion/core/tensor.h"
#include "pion/cuda/bench.h"
#include "pion/cuda/optim.h"
#include "pion/cuda/runtime.h"

namespace pion::cli::bench_optim {

namespace {

// The singular values of each matrix, from fp64 SVDs run in parallel (one OpenBLAS thread
// each).
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

// max over matrices of max_i |sigma_i(W) - sigma_i(W0)| / max_i sigma_i(W0): the drift and
// the worst matrix's name.
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

// The matrices in two device buffers (weights, gradients), placed by shape as CudaLlama
// lays out a model: one block per shape, its matrices evenly spaced in the order of the
using MakeCuda = std::function<std::unique_ptr<cuda::CudaOptimizer>(
    cuda::Context&, std::vector<cuda::DeviceParam>)>;

// specs, so Pion's batched GEMMs over a shape group can be strided-batched.
struct DeviceMatrices {
  cuda::DeviceBuffer weights, grads;
  std::vector<std::size_t> offsets;  // of matrix i, in floats

  explicit DeviceMatrices(const HostMatrices& h) : offsets(h.specs.size()) {
    std::vector<std::size_t> order(h.specs.size());
    for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::stable_sort(order.begin(), order.end(), [&](std::size_t x, std::size_t y) {
      return std::make_pair(h.specs[x].rows, h.specs[x].cols) <
             std::make_pair(h.specs[y].rows, h.specs[y].cols);
    });
    std::size_t total = 0;
    for (std::size_t i : order) {
      offsets[i] = total;
      total += static_cast<std::size_t>(h.weights[i].numel());
    }
    weights = cuda::DeviceBuffer(total);
    grads = cuda::DeviceBuffer(total);
    grads.upload(staged(h.grads).data(), total);
    reset_weights(h);
  }
  // Host matrices (in spec order) copied into one vector at this layout's offsets.
  std::vector<float> staged(const std::vector<Tensor>& host) const {
    std::vector<float> out(weights.size());
    for (std::size_t i = 0; i < host.size(); ++i)
      std::copy_n(host[i].data<float>(), host[i].numel(),
                  out.begin() + static_cast<std::ptrdiff_t>(offsets[i]));
    return out;
  }
  // The device weights <- the host initial weights (each optimizer starts from the same W0).
  void reset_weights(const HostMatrices& h) {
    weights.upload(staged(h.weights).data(), weights.size());
  }
  std::vector<cuda::DeviceParam> params(const HostMatrices& h) {
    std::vector<cuda::DeviceParam> out;
    for (std::size_t i = 0; i < h.specs.size(); ++i)
      out.push_back({h.specs[i].name, weights.data() + offsets[i], grads.data() + offsets[i],
                     h.specs[i].rows, h.specs[i].cols});
    return out;
  }
  // Every weight matrix, in spec order (one copy of the whole buffer).
  std::vector<Tensor> download(const HostMatrices& h) const {
    std::vector<float> all(weights.size());
    weights.download(all.data(), all.size());
    std::vector<Tensor> out;
    for (std::size_t i = 0; i < h.specs.size(); ++i) {
      Tensor t = Tensor::empty({h.specs[i].rows, h.specs[i].cols});
      std::copy_n(all.begin() + static_cast<std::ptrdiff_t>(offsets[i]), t.numel(),
                  t.data<float>());
      out.push_back(std::move(t));
    }
    return out;
  }
};

void check_weights(const DeviceMatrices& d, const HostMatrices& h, const std::string& who) {
  const std::vector<Tensor> all = d.download(h);
  for (std::size_t i : {std::size_t{0}, h.specs.size() - 1}) {
    const Tensor& w = all[i];
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

}  // namespace

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

  // strided false: every batched GEMM through pointer arrays, the layout-agnostic path, timed
  // beside the default so the table shows what the strided-batched calls gain.
  const auto pion_with = [](const std::string& precision, bool strided = true) -> MakeCuda {
    return [precision, strided](cuda::Context& c, std::vector<cuda::DeviceParam> p) {
      cuda::CudaPionOptions o;
      o.precision = precision;
      o.strided_gemms = strided;
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
  const std::vector<Gpu> runs = {
      {"pion_fp32", "Pion taylor2 fp32", "fp32", kMatrixLr, pion_flops, pion_alone_fp32,
       pion_with("fp32")},
      {"pion_mixed", "Pion taylor2 mixed (TF32 GEMMs)", "tf32", kMatrixLr, pion_flops,
       pion_alone_tf32, pion_with("mixed")},
      {"pion_fp32_pointers", "Pion taylor2 fp32, pointer-array GEMMs", "fp32", kMatrixLr,
       pion_flops, pion_alone_fp32, pion_with("fp32", false)},
      {"pion_mixed_pointers", "Pion taylor2 mixed, pointer-array GEMMs", "tf32", kMatrixLr,
       pion_flops, pion_alone_tf32, pion_with("mixed", false)},
      {"muon_bf16", "Muon NS5 bf16", "bf16", kMatrixLr, muon_flops, muon_alone_bf16,
       muon_with("bf16")},
      {"muon_fp32", "Muon NS5 fp32", "fp32", kMatrixLr, muon_flops, muon_alone_fp32,
       muon_with("fp32")},
      {"adamw", "AdamW", "", kAdamLr, 0.0, 0.0, adamw}};

  for (const Gpu& g : runs) {
    Result x = make_result(g.name, g.label, g.gemm, g.lr, g.flops, h.specs);
    x.gemms_alone_ms = g.alone_ms;
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
        const std::vector<Tensor> final_weights = d.download(h);
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

}  // namespace pion::cli::bench_optim

#endif  // PION_HAVE_CUDA
