// Muon on the GPU: the math of src/optim/muon.cpp (momentum lerp, Nesterov, quintic
// Newton-Schulz on X / (||X||_F + eps), shape scale, decoupled decay) with the matrices of
// one shape updated together by batched cuBLAS calls. Newton-Schulz runs either in bf16 with
// fp32 accumulation (as the reference does on GPUs; the default) or in fp32 (the CPU's
// arithmetic, for parity checks).
//
// Shapes (rows x cols = the parameter, r = min(rows, cols); every matrix row-major):
//   buf, X, X': rows x cols      Gram A and B = b A + c A A: r x r
#include <cuda_bf16.h>

#include <cmath>
#include <tuple>
#include <utility>

#include "../bf16.cuh"
#include "batched.cuh"
#include "common.cuh"

namespace pion::cuda {
namespace {

using detail::DeviceArray;
using detail::DevicePointers;
using detail::kBlocksPerMatrix;
using detail::kThreads;
using detail::StepScalars;
using bf16 = __nv_bfloat16;

// The reference's quintic coefficients (muon.cpp).
constexpr float kNsA = 3.4445f;
constexpr float kNsB = -4.7750f;
constexpr float kNsC = 2.0315f;

// torch.lerp's two-branch formula, as in muon.cpp.
__device__ inline float lerp(float start, float end, float w, float one_minus_w) {
  const float diff = __fsub_rn(end, start);
  return w < 0.5f ? __fadd_rn(start, __fmul_rn(w, diff))
                  : __fsub_rn(end, __fmul_rn(diff, one_minus_w));
}

// buf <- lerp(buf, s g, 1 - beta); x <- nesterov ? lerp(s g, buf, beta) : buf, s the step's
// gradient scale (s g rounded to float, as a clip pass over g would leave it). When the step
// is skipped: buf stays, x <- 0 (so Newton-Schulz sees zeros and stays finite). Grid
// detail::elementwise_grid; float4s when the three arrays are 16-byte aligned.
__global__ void momentum(float* const* buf_ptrs, float* const* grad_ptrs, float* const* x_ptrs,
                         std::int64_t count, float beta, float one_minus_beta, bool nesterov,
                         const StepScalars* scalars) {
  float* buf = buf_ptrs[blockIdx.y];
  const float* grad = grad_ptrs[blockIdx.y];
  float* x = x_ptrs[blockIdx.y];
  const bool skip = scalars->bad_grad != 0;
  const float scale = scalars->grad_scale;
  detail::for_each_lanes(count, detail::aligned16(buf, grad, x), [&](auto width, std::int64_t i) {
    constexpr int W = decltype(width)::value;
    detail::Lanes<float, W> out{};
    if (!skip) {
      detail::Lanes<float, W> b = detail::load_lanes<W>(buf, i);
      const detail::Lanes<float, W> g = detail::load_lanes<W>(grad, i);
#pragma unroll
      for (int l = 0; l < W; ++l) {
        const float gl = __fmul_rn(g.v[l], scale);
        b.v[l] = lerp(b.v[l], gl, one_minus_beta, beta);
        out.v[l] = nesterov ? lerp(gl, b.v[l], beta, one_minus_beta) : b.v[l];
      }
      detail::store_lanes<W>(buf, i, b);
    }
    detail::store_lanes<W>(x, i, out);
  });
}

// inv[b] = 1 / (||X_b||_F + eps) in double, rounded to float as on the CPU.
__global__ void inverse_norms(const double* partial, unsigned batch, double eps, float* inv) {
  const unsigned b = blockIdx.x * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  inv[b] = static_cast<float>(1.0 / (detail::norm_from_partials(partial, b) + eps));
}

// out_b[i] = x_b[i] * inv[b], rounded to T (float: in place is allowed). Grid
// detail::elementwise_grid.
template <class T>
__global__ void normalise(float* const* x_ptrs, T* const* out_ptrs, std::int64_t count,
                          const float* inv) {
  const float* x = x_ptrs[blockIdx.y];
  T* out = out_ptrs[blockIdx.y];
  const float s = inv[blockIdx.y];
  detail::for_each_lanes(count, detail::aligned16(x, out), [&](auto width, std::int64_t i) {
    constexpr int W = decltype(width)::value;
    const detail::Lanes<float, W> xv = detail::load_lanes<W>(x, i);
    detail::Lanes<T, W> o;
#pragma unroll
    for (int l = 0; l < W; ++l) o.v[l] = from_float<T>(__fmul_rn(xv.v[l], s));
    detail::store_lanes<W>(out, i, o);
  });
}

// W <- W - (lr wd W + lr shape_scale X), with lr wd and lr shape_scale formed in double and
// rounded (muon.cpp). Nothing when the step is skipped (no decay either, as on the CPU).
// Grid detail::elementwise_grid.
template <class T>
__global__ void apply_update(float* const* w_ptrs, T* const* x_ptrs, std::int64_t count,
                             double weight_decay, double shape_scale, const StepScalars* scalars) {
  if (scalars->bad_grad != 0) return;
  float* w = w_ptrs[blockIdx.y];
  const T* x = x_ptrs[blockIdx.y];
  const auto decay_rate = static_cast<float>(scalars->lr * weight_decay);
  const auto step = static_cast<float>(scalars->lr * shape_scale);
  detail::for_each_lanes(count, detail::aligned16(w, x), [&](auto width, std::int64_t i) {
    constexpr int W = decltype(width)::value;
    detail::Lanes<float, W> wv = detail::load_lanes<W>(w, i);
    const detail::Lanes<T, W> xv = detail::load_lanes<W>(x, i);
#pragma unroll
    for (int l = 0; l < W; ++l)
      wv.v[l] = __fsub_rn(
          wv.v[l], __fadd_rn(__fmul_rn(decay_rate, wv.v[l]), __fmul_rn(step, to_float(xv.v[l]))));
    detail::store_lanes<W>(w, i, wv);
  });
}

class CudaMuon final : public detail::CudaOptimizerBase {
 public:
  CudaMuon(Context& ctx, std::vector<DeviceParam> params, const CudaMuonOptions& o)
      : CudaOptimizerBase(ctx), options_(o) {
    validate_options<MuonOptions>(o, "muon (cuda)");
    bf16_ = detail::parse_precision(o.precision, "bf16", "muon (cuda)");
    // bf16: the Newton-Schulz iterates, Gram matrices and polynomials are bf16 (C too).
    types_ = gemm_types(bf16_ ? MatmulPrecision::Bf16 : MatmulPrecision::Fp32, true);
    set_params(params);
    for (const auto& [shape, indices] : detail::group_by_shape(params)) {
      groups_.emplace_back();
      Group& g = groups_.back();
      g.rows = static_cast<std::size_t>(shape.first);
      g.cols = static_cast<std::size_t>(shape.second);
      g.batch = indices.size();
      const std::size_t B = g.batch;
      check(B <= 65535, "muon (cuda): more than 65535 matrices of one shape");
      const std::size_t r = std::min(g.rows, g.cols);
      g.n_stride = detail::padded(g.rows * g.cols);
      g.rr_stride = detail::padded(r * r);
      g.buf = detail::zeroed(B * g.n_stride);
      g.x = DeviceArray<float>(B * g.n_stride);
      g.partial = DeviceArray<double>(B * kBlocksPerMatrix);
      g.inv = DeviceArray<float>(B);
      for (std::size_t b = 0; b < B; ++b) place(params[indices[b]].name, groups_.size() - 1, b);
      std::tie(g.w_ptrs, g.g_ptrs) = detail::value_and_grad_pointers(params, indices);
      g.buf_ptrs = detail::slice_pointers(g.buf.data(), B, g.n_stride);
      g.x_ptrs = detail::slice_pointers(g.x.data(), B, g.n_stride);
      if (bf16_) {
        g.xb[0] = DeviceArray<bf16>(B * g.n_stride);
        g.xb[1] = DeviceArray<bf16>(B * g.n_stride);
        g.gram_b = DeviceArray<bf16>(B * g.rr_stride);
        g.poly_b = DeviceArray<bf16>(B * g.rr_stride);
        g.ns_x[0] = detail::slice_pointers(g.xb[0].data(), B, g.n_stride);
        g.ns_x[1] = detail::slice_pointers(g.xb[1].data(), B, g.n_stride);
        g.gram_ptrs = detail::slice_pointers(g.gram_b.data(), B, g.rr_stride);
        g.poly_ptrs = detail::slice_pointers(g.poly_b.data(), B, g.rr_stride);
      } else {
        // Newton-Schulz ping-pongs between x (which the momentum pass filled) and x_next.
        g.x_next = DeviceArray<float>(B * g.n_stride);
        g.gram = DeviceArray<float>(B * g.rr_stride);
        g.poly = DeviceArray<float>(B * g.rr_stride);
        g.ns_x[0] = detail::slice_pointers(g.x.data(), B, g.n_stride);
        g.ns_x[1] = detail::slice_pointers(g.x_next.data(), B, g.n_stride);
        g.gram_ptrs = detail::slice_pointers(g.gram.data(), B, g.rr_stride);
        g.poly_ptrs = detail::slice_pointers(g.poly.data(), B, g.rr_stride);
      }
    }
  }

  std::string kind() const override { return "muon"; }

  HostState download_state(const std::string& name) const override {
    const auto [gi, b] = locate(name);
    const Group& g = groups_[gi];
    HostState out;
    out["momentum_buffer"] =
        detail::download_slice(ctx_, g.buf.data() + b * g.n_stride, g.rows * g.cols);
    return out;
  }

  void upload_state(const std::string& name, const HostState& state) override {
    const auto [gi, b] = locate(name);
    Group& g = groups_[gi];
    detail::upload_slice(ctx_, g.buf.data() + b * g.n_stride, state, "momentum_buffer",
                         g.rows * g.cols, who() + ": " + name);
  }

 private:
  struct Group {
    std::size_t rows = 0, cols = 0, batch = 0;
    std::size_t n_stride = 0, rr_stride = 0;  // slice strides (padded rows*cols, r*r)
    DeviceArray<float> buf;                   // state: momentum buffer
    DeviceArray<float> x;                     // the Nesterov update, then (fp32) NS input
    DeviceArray<float> x_next, gram, poly;    // fp32 Newton-Schulz
    DeviceArray<bf16> xb[2], gram_b, poly_b;  // bf16 Newton-Schulz
    DeviceArray<double> partial;
    DeviceArray<float> inv;
    DevicePointers w_ptrs, g_ptrs, buf_ptrs, x_ptrs, gram_ptrs, poly_ptrs;
    DevicePointers ns_x[2];  // the two Newton-Schulz iterates (fp32 or bf16)
  };

  void queue_update() override {
    for (Group& g : groups_) step_group(g);
  }

  // Device address of slice 0 of the iterate buffer i (the batch's slices are contiguous).
  void* ns_base(Group& g, int i) const {
    return bf16_ ? static_cast<void*>(g.xb[i].data())
                 : static_cast<void*>(i == 0 ? g.x.data() : g.x_next.data());
  }
  void* gram_base(Group& g) const {
    return bf16_ ? static_cast<void*>(g.gram_b.data()) : static_cast<void*>(g.gram.data());
  }
  void* poly_base(Group& g) const {
    return bf16_ ? static_cast<void*>(g.poly_b.data()) : static_cast<void*>(g.poly.data());
  }

  void step_group(Group& g) {
    cudaStream_t st = stream();
    cublasHandle_t h = blas();
    const GemmTypes& types = types_;
    const CudaMuonOptions& o = options_;
    const auto rows = static_cast<std::int64_t>(g.rows), cols = static_cast<std::int64_t>(g.cols);
    const std::int64_t n = rows * cols, r = std::min(rows, cols);
    const std::size_t B = g.batch;
    const dim3 grid = detail::elementwise_grid(n, B);
    const std::size_t elem = bf16_ ? sizeof(bf16) : sizeof(float);

    // X = nesterov(momentum(g)); X <- X / (||X||_F + eps) (into bf16 in that mode).
    momentum<<<grid, kThreads, 0, st>>>(g.buf_ptrs.as<float>(), g.g_ptrs.as<float>(),
                                        g.x_ptrs.as<float>(), n, static_cast<float>(o.momentum),
                                        static_cast<float>(1.0 - o.momentum), o.nesterov,
                                        scalars());
    PION_CUDA_CHECK_LAUNCH("muon momentum");
    detail::queue_sum_squares(st, g.x_ptrs, nullptr, n, B, g.partial.data());
    inverse_norms<<<static_cast<unsigned>((B + 127) / 128), 128, 0, st>>>(
        g.partial.data(), static_cast<unsigned>(B), o.eps, g.inv.data());
    PION_CUDA_CHECK_LAUNCH("muon inverse norms");
    if (bf16_)
      normalise<bf16>
          <<<grid, kThreads, 0, st>>>(g.x_ptrs.as<float>(), g.ns_x[0].as<bf16>(), n, g.inv.data());
    else
      normalise<float>
          <<<grid, kThreads, 0, st>>>(g.x_ptrs.as<float>(), g.ns_x[0].as<float>(), n, g.inv.data());
    PION_CUDA_CHECK_LAUNCH("muon normalise");

    // Newton-Schulz (newton_schulz_inplace in muon.cpp). The reference transposes a tall X
    // so that the Gram matrix is the small side; the transpose is folded into the GEMM flags
    // instead: for tall X with Y = X^T, A = Y Y^T = X^T X and Y' = a Y + B Y <=> X' = a X + X B^T.
    const bool tall = rows > cols;
    int cur = 0;
    for (int step = 0; step < o.ns_steps; ++step) {
      const DevicePointers& x = g.ns_x[cur];
      const DevicePointers& x_next = g.ns_x[1 - cur];
      // A (r x r): tall: X^T X = (cols x rows)(rows x cols), k = rows;
      //            wide: X X^T = (rows x cols)(cols x rows), k = cols. X's row stride: cols.
      if (tall)
        detail::gemm_group(h, types, true, false, r, r, rows, 1.0f, x, cols, x, cols, 0.0f,
                           g.gram_ptrs, r, B);
      else
        detail::gemm_group(h, types, false, true, r, r, cols, 1.0f, x, cols, x, cols, 0.0f,
                           g.gram_ptrs, r, B);
      // B = b A + c A A: poly <- A, then poly <- c A A + b poly ((r x r)(r x r), k = r).
      PION_CUDA_CHECK(cudaMemcpyAsync(poly_base(g), gram_base(g), B * g.rr_stride * elem,
                                      cudaMemcpyDeviceToDevice, st));
      detail::gemm_group(h, types, false, false, r, r, r, kNsC, g.gram_ptrs, r, g.gram_ptrs, r,
                         kNsB, g.poly_ptrs, r, B);
      // X' = a X + B X (wide: (r x r)(rows x cols), r = rows, k = rows) or
      //      a X + X B^T (tall: (rows x cols)(cols x cols), r = cols, k = cols):
      // x_next <- X, then x_next <- product + a x_next.
      PION_CUDA_CHECK(cudaMemcpyAsync(ns_base(g, 1 - cur), ns_base(g, cur), B * g.n_stride * elem,
                                      cudaMemcpyDeviceToDevice, st));
      if (tall)
        detail::gemm_group(h, types, false, true, rows, cols, cols, 1.0f, x, cols, g.poly_ptrs, r,
                           kNsA, x_next, cols, B);
      else
        detail::gemm_group(h, types, false, false, rows, cols, rows, 1.0f, g.poly_ptrs, r, x, cols,
                           kNsA, x_next, cols, B);
      cur = 1 - cur;
    }

    // Tall matrices get a larger step so the update RMS does not shrink with aspect ratio.
    const double shape_scale =
        std::sqrt(std::max(1.0, static_cast<double>(rows) / static_cast<double>(cols)));
    if (bf16_)
      apply_update<bf16><<<grid, kThreads, 0, st>>>(g.w_ptrs.as<float>(), g.ns_x[cur].as<bf16>(), n,
                                                    o.weight_decay, shape_scale, scalars());
    else
      apply_update<float><<<grid, kThreads, 0, st>>>(g.w_ptrs.as<float>(), g.ns_x[cur].as<float>(),
                                                     n, o.weight_decay, shape_scale, scalars());
    PION_CUDA_CHECK_LAUNCH("muon apply update");
  }

  CudaMuonOptions options_;
  bool bf16_ = true;
  GemmTypes types_{};
  std::vector<Group> groups_;
};

}  // namespace

std::unique_ptr<CudaOptimizer> make_cuda_muon(Context& ctx, std::vector<DeviceParam> params,
                                              const CudaMuonOptions& options) {
  return std::make_unique<CudaMuon>(ctx, std::move(params), options);
}

}  // namespace pion::cuda
