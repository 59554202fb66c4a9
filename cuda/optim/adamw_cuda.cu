// AdamW on the GPU with torch.optim.AdamW semantics: the arithmetic (and rounding order) of
// src/optim/adamw.cpp in one fused elementwise kernel. Parameters with the same number of
// elements (whatever their shape) share one launch; the bias corrections are formed on the
// device from the device-side step counter, so a captured step replays correctly.
#include <cmath>
#include <tuple>

#include "batched.cuh"
#include "common.cuh"

namespace pion::cuda {
namespace {

using detail::DeviceArray;
using detail::DevicePointers;
using detail::kThreads;
using detail::StepScalars;

// What adamw.cpp computes on the host per step, in double then rounded to float.
struct StepFactors {
  float step_size;   // lr / (1 - beta1^t)
  float bias2_sqrt;  // sqrt(1 - beta2^t)
  float decay_rate;  // lr * weight_decay
};

__global__ void step_factors(const StepScalars* scalars, double beta1, double beta2,
                             double weight_decay, StepFactors* out) {
  const auto t = static_cast<double>(scalars->steps);  // already counts this step
  const double bias1 = 1.0 - pow(beta1, t), bias2 = 1.0 - pow(beta2, t);
  out->step_size = static_cast<float>(scalars->lr / bias1);
  out->bias2_sqrt = static_cast<float>(sqrt(bias2));
  out->decay_rate = static_cast<float>(scalars->lr * weight_decay);
}

struct Coefficients {
  float b1, one_minus_b1, b2, one_minus_b2, eps;  // 1 - b in double, then rounded
};

// adamw.cpp's loop body for one element, with no FMA contraction (__f*_rn) so each value
// rounds the same.
__device__ inline void adamw_element(float& w, float g, float& m, float& v, const Coefficients& k,
                                     const StepFactors& s) {
  float wi = __fsub_rn(w, __fmul_rn(s.decay_rate, w));
  const float mi = __fadd_rn(__fmul_rn(m, k.b1), __fmul_rn(k.one_minus_b1, g));
  const float vi = __fadd_rn(__fmul_rn(v, k.b2), __fmul_rn(__fmul_rn(k.one_minus_b2, g), g));
  const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), s.bias2_sqrt), k.eps);
  wi = __fsub_rn(wi, __fdiv_rn(__fmul_rn(s.step_size, mi), denom));
  m = mi;
  v = vi;
  w = wi;
}

// Grid detail::elementwise_grid. When the matrix's four arrays are 16-byte aligned, each
// thread moves float4s (one 16-byte load per array per step) and the count % 4 tail goes
// element by element; otherwise every element is scalar. Each element gets the same
// arithmetic either way (same bits). The gradient is read times the step's gradient scale
// (rounded to float, as a clip pass over g would leave it).
__global__ void adamw_update(float* const* w_ptrs, float* const* g_ptrs, float* const* m_ptrs,
                             float* const* v_ptrs, std::int64_t count, Coefficients k,
                             const StepFactors* f, const StepScalars* scalars) {
  if (scalars->bad_grad != 0) return;
  float* w = w_ptrs[blockIdx.y];
  const float* grad = g_ptrs[blockIdx.y];
  float* m = m_ptrs[blockIdx.y];
  float* v = v_ptrs[blockIdx.y];
  const StepFactors s = *f;
  const float scale = scalars->grad_scale;
  detail::for_each_lanes(count, detail::aligned16(w, grad, m, v), [&](auto width, std::int64_t i) {
    constexpr int W = decltype(width)::value;
    detail::Lanes<float, W> wv = detail::load_lanes<W>(w, i);
    const detail::Lanes<float, W> gv = detail::load_lanes<W>(grad, i);
    detail::Lanes<float, W> mv = detail::load_lanes<W>(m, i);
    detail::Lanes<float, W> vv = detail::load_lanes<W>(v, i);
#pragma unroll
    for (int l = 0; l < W; ++l)
      adamw_element(wv.v[l], __fmul_rn(gv.v[l], scale), mv.v[l], vv.v[l], k, s);
    detail::store_lanes<W>(m, i, mv);
    detail::store_lanes<W>(v, i, vv);
    detail::store_lanes<W>(w, i, wv);
  });
}

class CudaAdamW final : public detail::CudaOptimizerBase {
 public:
  CudaAdamW(Context& ctx, std::vector<DeviceParam> params, const CudaAdamWOptions& o)
      : CudaOptimizerBase(ctx), options_(o), factors_(1) {
    validate_options(o, "adamw (cuda)");
    set_params(params);
    const auto by_count = detail::group_params<std::int64_t>(
        params, [](const DeviceParam& p) { return p.rows * p.cols; });
    for (const auto& [count, indices] : by_count) {
      groups_.emplace_back();
      Group& g = groups_.back();
      g.count = static_cast<std::size_t>(count);
      g.batch = indices.size();
      check(g.batch <= 65535, "adamw (cuda): more than 65535 parameters of one size");
      g.stride = detail::padded(g.count);
      g.exp_avg = detail::zeroed(g.batch * g.stride);
      g.exp_avg_sq = detail::zeroed(g.batch * g.stride);
      for (std::size_t b = 0; b < g.batch; ++b)
        place(params[indices[b]].name, groups_.size() - 1, b);
      std::tie(g.w_ptrs, g.g_ptrs) = detail::value_and_grad_pointers(params, indices);
      g.m_ptrs = detail::slice_pointers(g.exp_avg.data(), g.batch, g.stride);
      g.v_ptrs = detail::slice_pointers(g.exp_avg_sq.data(), g.batch, g.stride);
    }
  }

  std::string kind() const override { return "adamw"; }

  HostState download_state(const std::string& name) const override {
    const auto [gi, b] = locate(name);
    const Group& g = groups_[gi];
    HostState out;
    out["exp_avg"] = detail::download_slice(ctx_, g.exp_avg.data() + b * g.stride, g.count);
    out["exp_avg_sq"] = detail::download_slice(ctx_, g.exp_avg_sq.data() + b * g.stride, g.count);
    return out;
  }

  void upload_state(const std::string& name, const HostState& state) override {
    const auto [gi, b] = locate(name);
    Group& g = groups_[gi];
    const std::string who = this->who() + ": " + name;
    detail::upload_slice(ctx_, g.exp_avg.data() + b * g.stride, state, "exp_avg", g.count, who);
    detail::upload_slice(ctx_, g.exp_avg_sq.data() + b * g.stride, state, "exp_avg_sq", g.count,
                         who);
  }

 private:
  struct Group {
    std::size_t count = 0, batch = 0, stride = 0;
    DeviceArray<float> exp_avg, exp_avg_sq;
    DevicePointers w_ptrs, g_ptrs, m_ptrs, v_ptrs;
  };

  void queue_update() override {
    const CudaAdamWOptions& o = options_;
    cudaStream_t st = stream();
    step_factors<<<1, 1, 0, st>>>(scalars(), o.beta1, o.beta2, o.weight_decay, factors_.data());
    PION_CUDA_CHECK_LAUNCH("adamw step factors");
    const Coefficients k{static_cast<float>(o.beta1), static_cast<float>(1.0 - o.beta1),
                         static_cast<float>(o.beta2), static_cast<float>(1.0 - o.beta2),
                         static_cast<float>(o.eps)};
    for (const Group& g : groups_) {
      adamw_update<<<detail::elementwise_grid(static_cast<std::int64_t>(g.count), g.batch),
                     kThreads, 0, st>>>(
          g.w_ptrs.as<float>(), g.g_ptrs.as<float>(), g.m_ptrs.as<float>(), g.v_ptrs.as<float>(),
          static_cast<std::int64_t>(g.count), k, factors_.data(), scalars());
      PION_CUDA_CHECK_LAUNCH("adamw update");
    }
  }

  CudaAdamWOptions options_;
  DeviceArray<StepFactors> factors_;
  std::vector<Group> groups_;
};

}  // namespace

std::unique_ptr<CudaOptimizer> make_cuda_adamw(Context& ctx, std::vector<DeviceParam> params,
                                               const CudaAdamWOptions& options) {
  return std::make_unique<CudaAdamW>(ctx, std::move(params), options);
}

}  // namespace pion::cuda
