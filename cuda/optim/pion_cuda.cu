// Pion on the GPU, taylor2 retraction: the math of src/optim/pion.cpp (definitions in
// src/optim/pion_math.h) with every matrix of one shape updated by batched cuBLAS calls.
// Per shape group and step: 7 batched GEMMs and 6 other launches (finite check, moment
// pass, norm partials, step scales, direction scaling, two elementwise adds: the moment
// pass covers both sides' generators, skew parts, moments and directions in one kernel per
// side). alpha and s = lr * alpha stay on the device.
//
// Shapes (m = d_out, n = d_in; every matrix row-major):
//   W, g, P = A_out W, Q = W A_in: m x n      A_in, m_in, v_in: n x n     A_out, ...: m x m
//
// One deliberate difference in rounding from the CPU: cuBLAS takes one alpha per batched
// call, but s differs per matrix, so s is folded into the operands (A <- s A, then P <- s P
// or Q <- s Q) instead of into the GEMM scalars: (s^2/2) A P on the CPU is 0.5 (sA)(sP) here.
// Same formula; the results differ at fp32 rounding level.
#include <cmath>
#include <tuple>

#include "batched.cuh"
#include "common.cuh"

namespace pion::cuda {
namespace {

using detail::DeviceArray;
using detail::DevicePointers;
using detail::kBlocksPerMatrix;
using detail::kThreads;
using detail::StepScalars;

constexpr int kTile = 32;     // moment pass: 32 x 32 tiles ...
constexpr int kTileRows = 8;  // ... walked by 32 x 8 threads

struct MomentCoefficients {
  float b1, c1, b2, c2, eps;  // c = 1 - b, computed in double and rounded (as on the CPU)
};

// In place on the d x d product X of each matrix of the batch (W^T g or g W^T): G = X - X^T,
// m <- b1 m + c1 G, v <- b2 v + c2 G*G, X <- A = -m / (sqrt(v) + eps). The same upper-
// triangle-and-mirror scheme as pion_math::update_moments_and_direction: block (tj, ti)
// with ti <= tj computes the upper tile (rows i0.., cols j0..) element by element with the
// CPU's rounding (no FMA contraction: __f*_rn), then writes the lower tile (rows j0.., cols
// i0..) as its mirror (A and m negated, v copied). So m and A come out exactly skew and v
// exactly symmetric, and for the same X the values equal the CPU's bit for bit. X^T is read
// through shared memory so global reads and writes stay coalesced. Blocks with tj < ti exit
// at once (their tiles belong to the mirrored block); no two blocks touch the same element.
// When the step's gradients are not finite, A <- 0 and m, v stay as they were.
__global__ void moments_and_direction(float* const* x_ptrs, float* const* m_ptrs,
                                      float* const* v_ptrs, int d, MomentCoefficients k,
                                      const StepScalars* scalars) {
  const int ti = static_cast<int>(blockIdx.y), tj = static_cast<int>(blockIdx.x);
  if (tj < ti) return;  // the whole block leaves together: no barrier is skipped
  float* x = x_ptrs[blockIdx.z];
  float* m = m_ptrs[blockIdx.z];
  float* v = v_ptrs[blockIdx.z];
  const bool skip = scalars->bad_grad != 0;
  const int i0 = ti * kTile, j0 = tj * kTile;
  const int tx = static_cast<int>(threadIdx.x), ty = static_cast<int>(threadIdx.y);
  // lower[r][c] = X[j0 + r][i0 + c]; the + 1 keeps column reads free of bank conflicts.
  __shared__ float lower[kTile][kTile + 1];
  __shared__ float res_a[kTile][kTile + 1], res_m[kTile][kTile + 1], res_v[kTile][kTile + 1];

  for (int r = ty; r < kTile; r += kTileRows) {
    const int row = j0 + r, col = i0 + tx;
    if (row < d && col < d) lower[r][tx] = x[static_cast<std::int64_t>(row) * d + col];
  }
  __syncthreads();
  // Upper element (i, j) = (i0 + r, j0 + tx), j >= i; its mirror X[j][i] is lower[tx][r].
  for (int r = ty; r < kTile; r += kTileRows) {
    const int i = i0 + r, j = j0 + tx;
    if (i >= d || j >= d || j < i) continue;
    const std::int64_t at = static_cast<std::int64_t>(i) * d + j;
    if (skip) {
      x[at] = 0.0f;
      res_a[r][tx] = 0.0f;
      continue;
    }
    const float g = __fsub_rn(x[at], lower[tx][r]);
    const float mj = __fadd_rn(__fmul_rn(k.b1, m[at]), __fmul_rn(k.c1, g));
    const float vj = __fadd_rn(__fmul_rn(k.b2, v[at]), __fmul_rn(__fmul_rn(k.c2, g), g));
    const float a = __fdiv_rn(-mj, __fadd_rn(__fsqrt_rn(vj), k.eps));
    m[at] = mj;
    v[at] = vj;
    x[at] = a;
    res_a[r][tx] = a;
    res_m[r][tx] = mj;
    res_v[r][tx] = vj;
  }
  __syncthreads();
  // Lower element (j0 + r, i0 + tx), strictly below the diagonal: the mirror of upper
  // element (i0 + tx, j0 + r), which the loop above stored at res[tx][r].
  for (int r = ty; r < kTile; r += kTileRows) {
    const int row = j0 + r, col = i0 + tx;
    if (row >= d || col >= d || row <= col) continue;
    const std::int64_t at = static_cast<std::int64_t>(row) * d + col;
    x[at] = -res_a[tx][r];
    if (!skip) {
      m[at] = -res_m[tx][r];
      v[at] = res_v[tx][r];
    }
  }
}

// s[b] = lr * alpha_b, alpha_b = c sqrt(d_out d_in) / (||P_b + Q_b||_F + eps), in double
// then rounded (as the CPU's step_scale and cast). 0 when the step is skipped: with A = 0
// and s = 0 every GEMM below yields exact zeros and W + 0 leaves W bit for bit.
__global__ void step_scales(const double* partial, unsigned batch, double c_sqrt_mn, double eps,
                            const StepScalars* scalars, float* s) {
  const unsigned b = blockIdx.x * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  s[b] = scalars->bad_grad != 0
             ? 0.0f
             : static_cast<float>(scalars->lr *
                                  (c_sqrt_mn / (detail::norm_from_partials(partial, b) + eps)));
}

// A_in <- s A_in and A_out <- s A_out for every matrix b: blocks [0, kBlocksPerMatrix) of
// the x grid take A_in, the next kBlocksPerMatrix take A_out.
__global__ void scale_directions(float* const* a_in_ptrs, std::int64_t nn, float* const* a_out_ptrs,
                                 std::int64_t mm, const float* s) {
  const bool in = blockIdx.x < kBlocksPerMatrix;
  float* a = in ? a_in_ptrs[blockIdx.y] : a_out_ptrs[blockIdx.y];
  const std::int64_t count = in ? nn : mm;
  const std::int64_t block = in ? blockIdx.x : blockIdx.x - kBlocksPerMatrix;
  const float sb = s[blockIdx.y];
  for (std::int64_t i = block * blockDim.x + threadIdx.x; i < count;
       i += static_cast<std::int64_t>(kBlocksPerMatrix) * blockDim.x)
    a[i] = __fmul_rn(a[i], sb);
}

// a_b <- s_b a_b; out_b <- w_b + a_b (the CPU's add_scaled(w, a, s, out), same rounding).
__global__ void scale_then_add(float* const* w_ptrs, float* const* a_ptrs, float* const* out_ptrs,
                               std::int64_t count, const float* s) {
  const float* w = w_ptrs[blockIdx.y];
  float* a = a_ptrs[blockIdx.y];
  float* out = out_ptrs[blockIdx.y];
  const float sb = s[blockIdx.y];
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const float scaled = __fmul_rn(a[i], sb);
    a[i] = scaled;
    out[i] = __fadd_rn(w[i], scaled);
  }
}

// out_b = x_b + y_b.
__global__ void add(float* const* x_ptrs, float* const* y_ptrs, float* const* out_ptrs,
                    std::int64_t count) {
  const float* x = x_ptrs[blockIdx.y];
  const float* y = y_ptrs[blockIdx.y];
  float* out = out_ptrs[blockIdx.y];
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
    out[i] = __fadd_rn(x[i], y[i]);
}

class CudaPion final : public detail::CudaOptimizerBase {
 public:
  CudaPion(Context& ctx, std::vector<DeviceParam> params, const CudaPionOptions& o)
      : CudaOptimizerBase(ctx), options_(o) {
    validate_options<PionOptions>(o, "pion (cuda)");
    check(o.retraction == PionRetraction::Taylor2,
          std::string("--device cuda runs Pion's taylor2 retraction only ('") +
              retraction_name(o.retraction) + "' is CPU-only for now): use taylor2 or the CPU");
    check(o.reanchor_every == 0,
          "--device cuda does not re-anchor Pion yet: set reanchor_every 0 or use the CPU");
    types_ = gemm_types(detail::parse_precision(o.precision, "mixed", "pion (cuda)")
                            ? MatmulPrecision::Tf32
                            : MatmulPrecision::Fp32);
    set_params(params);
    for (const auto& [shape, indices] : detail::group_by_shape(params)) {
      groups_.emplace_back();
      Group& g = groups_.back();
      g.m = static_cast<std::size_t>(shape.first);
      g.n = static_cast<std::size_t>(shape.second);
      g.batch = indices.size();
      const std::size_t B = g.batch;
      check(B <= 65535, "pion (cuda): more than 65535 matrices of one shape");
      check((g.m + kTile - 1) / kTile <= 65535 && (g.n + kTile - 1) / kTile <= 65535,
            "pion (cuda): a matrix side is too long for the moment pass's grid");
      g.nn = detail::padded(g.n * g.n);
      g.mm = detail::padded(g.m * g.m);
      g.mn = detail::padded(g.m * g.n);
      g.m_in = detail::zeroed(B * g.nn);
      g.v_in = detail::zeroed(B * g.nn);
      g.m_out = detail::zeroed(B * g.mm);
      g.v_out = detail::zeroed(B * g.mm);
      g.a_in = DeviceArray<float>(B * g.nn);
      g.a_out = DeviceArray<float>(B * g.mm);
      g.p = DeviceArray<float>(B * g.mn);
      g.q = DeviceArray<float>(B * g.mn);
      g.partial = DeviceArray<double>(B * kBlocksPerMatrix);
      g.s = DeviceArray<float>(B);
      for (std::size_t b = 0; b < B; ++b) place(params[indices[b]].name, groups_.size() - 1, b);
      std::tie(g.w_ptrs, g.g_ptrs) = detail::value_and_grad_pointers(params, indices);
      g.m_in_ptrs = detail::slice_pointers(g.m_in.data(), B, g.nn);
      g.v_in_ptrs = detail::slice_pointers(g.v_in.data(), B, g.nn);
      g.m_out_ptrs = detail::slice_pointers(g.m_out.data(), B, g.mm);
      g.v_out_ptrs = detail::slice_pointers(g.v_out.data(), B, g.mm);
      g.a_in_ptrs = detail::slice_pointers(g.a_in.data(), B, g.nn);
      g.a_out_ptrs = detail::slice_pointers(g.a_out.data(), B, g.mm);
      g.p_ptrs = detail::slice_pointers(g.p.data(), B, g.mn);
      g.q_ptrs = detail::slice_pointers(g.q.data(), B, g.mn);
    }
  }

  std::string kind() const override { return "pion"; }

  HostState download_state(const std::string& name) const override {
    const auto [gi, b] = locate(name);
    const Group& g = groups_[gi];
    const std::size_t nn = g.n * g.n, mm = g.m * g.m;
    HostState out;
    out["m_in"] = detail::download_slice(ctx_, g.m_in.data() + b * g.nn, nn);
    out["v_in"] = detail::download_slice(ctx_, g.v_in.data() + b * g.nn, nn);
    out["m_out"] = detail::download_slice(ctx_, g.m_out.data() + b * g.mm, mm);
    out["v_out"] = detail::download_slice(ctx_, g.v_out.data() + b * g.mm, mm);
    return out;
  }

  void upload_state(const std::string& name, const HostState& state) override {
    const auto [gi, b] = locate(name);
    Group& g = groups_[gi];
    const std::size_t nn = g.n * g.n, mm = g.m * g.m;
    const std::string who = this->who() + ": " + name;
    detail::upload_slice(ctx_, g.m_in.data() + b * g.nn, state, "m_in", nn, who);
    detail::upload_slice(ctx_, g.v_in.data() + b * g.nn, state, "v_in", nn, who);
    detail::upload_slice(ctx_, g.m_out.data() + b * g.mm, state, "m_out", mm, who);
    detail::upload_slice(ctx_, g.v_out.data() + b * g.mm, state, "v_out", mm, who);
  }

 private:
  struct Group {
    std::size_t m = 0, n = 0, batch = 0;          // d_out, d_in, matrices
    std::size_t nn = 0, mm = 0, mn = 0;           // slice strides (padded n*n, m*m, m*n)
    DeviceArray<float> m_in, v_in, m_out, v_out;  // state, one slice per matrix
    DeviceArray<float> a_in, a_out, p, q;         // scratch: X then A; P = A_out W, Q = W A_in
    DeviceArray<double> partial;                  // norm partial sums
    DeviceArray<float> s;                         // s = lr * alpha per matrix
    DevicePointers w_ptrs, g_ptrs, m_in_ptrs, v_in_ptrs, m_out_ptrs, v_out_ptrs, a_in_ptrs,
        a_out_ptrs, p_ptrs, q_ptrs;
  };

  // Per shape group: the scaled directions (common to every retraction), then the
  // retraction that moves W along them. taylor2 is the only one on the GPU so far; another
  // retraction is a second retract_* beside retract_taylor2, chosen here.
  void queue_update() override {
    for (Group& g : groups_) {
      queue_directions(g);
      retract_taylor2(g);
    }
  }

  // Generators, moments and directions, then s = lr * alpha: leaves A_in <- s A_in,
  // A_out <- s A_out in g.a_in / g.a_out, P = A_out W and Q = W A_in (unscaled) in g.p / g.q
  // and s per matrix in g.s.
  void queue_directions(Group& g) {
    cudaStream_t st = stream();
    cublasHandle_t h = blas();
    const GemmTypes& types = types_;
    const auto m = static_cast<std::int64_t>(g.m), n = static_cast<std::int64_t>(g.n);
    const std::size_t B = g.batch;
    const CudaPionOptions& o = options_;
    const DevicePointers &W = g.w_ptrs, &G = g.g_ptrs, &Ain = g.a_in_ptrs, &Aout = g.a_out_ptrs,
                         &P = g.p_ptrs, &Q = g.q_ptrs;

    // Generators through one GEMM each (pion.cpp): X_in = W^T g is (n x m)(m x n) = n x n,
    // k = m; X_out = g W^T is (m x n)(n x m) = m x m, k = n. Row strides: W, g: n.
    detail::gemm_group(h, types, true, false, n, n, m, 1.0f, W, n, G, n, 0.0f, Ain, n, B);
    detail::gemm_group(h, types, false, true, m, m, n, 1.0f, G, n, W, n, 0.0f, Aout, m, B);
    // Skew parts, moments and directions, in place: Ain <- A_in, Aout <- A_out.
    const MomentCoefficients k{static_cast<float>(o.beta1), static_cast<float>(1.0 - o.beta1),
                               static_cast<float>(o.beta2), static_cast<float>(1.0 - o.beta2),
                               static_cast<float>(o.eps)};
    const dim3 tile_block(kTile, kTileRows);
    const auto tiles_n = static_cast<unsigned>((g.n + kTile - 1) / kTile);
    const auto tiles_m = static_cast<unsigned>((g.m + kTile - 1) / kTile);
    moments_and_direction<<<dim3(tiles_n, tiles_n, static_cast<unsigned>(B)), tile_block, 0, st>>>(
        Ain.as<float>(), g.m_in_ptrs.as<float>(), g.v_in_ptrs.as<float>(), static_cast<int>(n), k,
        scalars());
    PION_CUDA_CHECK_LAUNCH("pion moments (in)");
    moments_and_direction<<<dim3(tiles_m, tiles_m, static_cast<unsigned>(B)), tile_block, 0, st>>>(
        Aout.as<float>(), g.m_out_ptrs.as<float>(), g.v_out_ptrs.as<float>(), static_cast<int>(m),
        k, scalars());
    PION_CUDA_CHECK_LAUNCH("pion moments (out)");

    // P = A_out W: (m x m)(m x n), k = m, row strides m, n -> n.
    // Q = W A_in:  (m x n)(n x n), k = n, row strides n, n -> n.
    detail::gemm_group(h, types, false, false, m, n, m, 1.0f, Aout, m, W, n, 0.0f, P, n, B);
    detail::gemm_group(h, types, false, false, m, n, n, 1.0f, W, n, Ain, n, 0.0f, Q, n, B);
    // s = lr * alpha from ||P + Q||_F, on the device.
    detail::queue_sum_squares(st, P, &Q, m * n, B, g.partial.data());
    const double c_sqrt_mn = o.c * std::sqrt(static_cast<double>(m) * static_cast<double>(n));
    step_scales<<<static_cast<unsigned>((B + 127) / 128), 128, 0, st>>>(
        g.partial.data(), static_cast<unsigned>(B), c_sqrt_mn, o.eps, scalars(), g.s.data());
    PION_CUDA_CHECK_LAUNCH("pion step scales");
    // A <- s A on both sides, so E2(sA) = I + (sA) + (sA)^2/2 needs only constant GEMM scalars.
    scale_directions<<<dim3(2 * kBlocksPerMatrix, static_cast<unsigned>(B)), kThreads, 0, st>>>(
        Ain.as<float>(), n * n, Aout.as<float>(), m * m, g.s.data());
    PION_CUDA_CHECK_LAUNCH("pion scale directions");
  }

  // W <- E2(sA_out) W E2(sA_in), E2(X) = I + X + X^2/2, from what queue_directions left.
  void retract_taylor2(Group& g) {
    cudaStream_t st = stream();
    cublasHandle_t h = blas();
    const GemmTypes& types = types_;
    const auto m = static_cast<std::int64_t>(g.m), n = static_cast<std::int64_t>(g.n);
    const std::size_t B = g.batch;
    const dim3 grid = detail::batch_grid(B);
    const DevicePointers &W = g.w_ptrs, &Ain = g.a_in_ptrs, &Aout = g.a_out_ptrs, &P = g.p_ptrs,
                         &Q = g.q_ptrs;
    // A means sA here. Every product below is m x n with row stride n; A_out has row stride
    // m and k = m, A_in row stride n and k = n.
    const std::int64_t count = m * n;
    if (m >= n) {
      // Left first (pion_math::taylor2_left_first, apply_taylor2):
      //   P <- sP;  Q <- LW = W + sP + (1/2)(sA_out)(sP)
      scale_then_add<<<grid, kThreads, 0, st>>>(W.as<float>(), P.as<float>(), Q.as<float>(), count,
                                                g.s.data());
      PION_CUDA_CHECK_LAUNCH("pion left: W + sP");
      detail::gemm_group(h, types, false, false, m, n, m, 0.5f, Aout, m, P, n, 1.0f, Q, n, B);
      //   P <- R' = LW (sA_in) = sR;  W <- LW + sR + (1/2) (sR)(sA_in)
      detail::gemm_group(h, types, false, false, m, n, n, 1.0f, Q, n, Ain, n, 0.0f, P, n, B);
      add<<<grid, kThreads, 0, st>>>(Q.as<float>(), P.as<float>(), W.as<float>(), count);
      PION_CUDA_CHECK_LAUNCH("pion left: LW + sR");
      detail::gemm_group(h, types, false, false, m, n, n, 0.5f, P, n, Ain, n, 1.0f, W, n, B);
    } else {
      // Right first, the mirror image:
      //   Q <- sQ;  P <- WR = W + sQ + (1/2)(sQ)(sA_in)
      scale_then_add<<<grid, kThreads, 0, st>>>(W.as<float>(), Q.as<float>(), P.as<float>(), count,
                                                g.s.data());
      PION_CUDA_CHECK_LAUNCH("pion right: W + sQ");
      detail::gemm_group(h, types, false, false, m, n, n, 0.5f, Q, n, Ain, n, 1.0f, P, n, B);
      //   Q <- L' = (sA_out) WR = sL;  W <- WR + sL + (1/2)(sA_out)(sL)
      detail::gemm_group(h, types, false, false, m, n, m, 1.0f, Aout, m, P, n, 0.0f, Q, n, B);
      add<<<grid, kThreads, 0, st>>>(P.as<float>(), Q.as<float>(), W.as<float>(), count);
      PION_CUDA_CHECK_LAUNCH("pion right: WR + sL");
      detail::gemm_group(h, types, false, false, m, n, m, 0.5f, Aout, m, Q, n, 1.0f, W, n, B);
    }
  }

  CudaPionOptions options_;
  GemmTypes types_{};
  std::vector<Group> groups_;
};

}  // namespace

std::unique_ptr<CudaOptimizer> make_cuda_pion(Context& ctx, std::vector<DeviceParam> params,
                                              const CudaPionOptions& options) {
  return std::make_unique<CudaPion>(ctx, std::move(params), options);
}

}  // namespace pion::cuda
