// Pion on the GPU, taylor2 retraction: the math of src/optim/pion.cpp (definitions in
// src/optim/pion_math.h) with every matrix of one shape updated by batched cuBLAS calls.
// Per shape group and step: 7 batched GEMMs and 7 other launches (finite check, unless the
// caller turned it off; the gradient scale, which returns at once when it is 1; moment pass,
// norm partials, step scales, direction scaling, two elementwise adds: the moment pass
// covers both sides' generators, skew parts, moments and directions in one kernel per
// side). alpha and s = lr * alpha stay on the device.
//
// The variants (issue 11, pion.cpp; their kernels are in pion_variants.cu): update_side
// left / right form and rotate one side only (5 GEMMs); alternate forms both and zeroes the
// idle side's direction on the device (the step count lives there), so it costs a two-sided
// step. momentum ambient / transported keep Adam moments of the d_out x d_in gradient and
// take the direction's skew projections (transported also turns m by the step's rotation:
// 3 - 5 GEMMs more); normalizer msign runs Muon's fp32 Newton-Schulz on each side's buffer.
//
// Shapes (m = d_out, n = d_in; every matrix row-major):
//   W, g, P = A_out W, Q = W A_in: m x n      A_in, m_in, v_in: n x n     A_out, ...: m x m
//
// One deliberate difference in rounding from the CPU: cuBLAS takes one alpha per batched
// call, but s differs per matrix, so s is folded into the operands (A <- s A, then P <- s P
// or Q <- s Q) instead of into the GEMM scalars: (s^2/2) A P on the CPU is 0.5 (sA)(sP) here.
// Same formula; the results differ at fp32 rounding level.
#include <cmath>
#include <map>
#include <string>
#include <tuple>
#include <vector>

#include "batched.cuh"
#include "common.cuh"
#include "pion_variants.cuh"

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
// When the step's gradients are not finite, A <- 0 and m, v stay as they were; the same
// when `parity` is 0 or 1 and this step's applied-step count has the other parity (update_side
// alternate: the side that does not rotate this step keeps its moments, and A = 0 makes the
// two-sided retraction below exactly the one-sided one). parity -1: the side always rotates.
__global__ void moments_and_direction(float* const* x_ptrs, float* const* m_ptrs,
                                      float* const* v_ptrs, int d, MomentCoefficients k,
                                      const StepScalars* scalars, int parity) {
  const int ti = static_cast<int>(blockIdx.y), tj = static_cast<int>(blockIdx.x);
  if (tj < ti) return;  // the whole block leaves together: no barrier is skipped
  float* x = x_ptrs[blockIdx.z];
  float* m = m_ptrs[blockIdx.z];
  float* v = v_ptrs[blockIdx.z];
  const bool skip =
      scalars->bad_grad != 0 || (parity >= 0 && static_cast<int>(scalars->steps & 1) != parity);
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

// A_in <- s A_in and A_out <- s A_out for every matrix b: the first in_blocks blocks of the
// x grid take A_in, the rest A_out (each side sized by its count, as elementwise_grid).
__global__ void scale_directions(float* const* a_in_ptrs, std::int64_t nn, float* const* a_out_ptrs,
                                 std::int64_t mm, unsigned in_blocks, const float* s) {
  const bool in = blockIdx.x < in_blocks;
  float* a = in ? a_in_ptrs[blockIdx.y] : a_out_ptrs[blockIdx.y];
  const std::int64_t count = in ? nn : mm;
  const std::int64_t block = in ? blockIdx.x : blockIdx.x - in_blocks;
  const std::int64_t blocks = in ? in_blocks : gridDim.x - in_blocks;
  const float sb = s[blockIdx.y];
  detail::for_each_lanes(count, detail::aligned16(a), block, blocks,
                         [&](auto width, std::int64_t i) {
                           constexpr int W = decltype(width)::value;
                           detail::Lanes<float, W> v = detail::load_lanes<W>(a, i);
#pragma unroll
                           for (int l = 0; l < W; ++l) v.v[l] = __fmul_rn(v.v[l], sb);
                           detail::store_lanes<W>(a, i, v);
                         });
}

// a_b <- s_b a_b; out_b <- w_b + a_b (the CPU's add_scaled(w, a, s, out), same rounding).
// out may be w. Grid detail::elementwise_grid.
__global__ void scale_then_add(float* const* w_ptrs, float* const* a_ptrs, float* const* out_ptrs,
                               std::int64_t count, const float* s) {
  const float* w = w_ptrs[blockIdx.y];
  float* a = a_ptrs[blockIdx.y];
  float* out = out_ptrs[blockIdx.y];
  const float sb = s[blockIdx.y];
  detail::for_each_lanes(count, detail::aligned16(w, a, out), [&](auto width, std::int64_t i) {
    constexpr int W = decltype(width)::value;
    const detail::Lanes<float, W> wv = detail::load_lanes<W>(w, i);
    detail::Lanes<float, W> av = detail::load_lanes<W>(a, i);
    detail::Lanes<float, W> o;
#pragma unroll
    for (int l = 0; l < W; ++l) {
      av.v[l] = __fmul_rn(av.v[l], sb);
      o.v[l] = __fadd_rn(wv.v[l], av.v[l]);
    }
    detail::store_lanes<W>(a, i, av);
    detail::store_lanes<W>(out, i, o);
  });
}

// out_b = x_b + y_b. Grid detail::elementwise_grid.
__global__ void add(float* const* x_ptrs, float* const* y_ptrs, float* const* out_ptrs,
                    std::int64_t count) {
  const float* x = x_ptrs[blockIdx.y];
  const float* y = y_ptrs[blockIdx.y];
  float* out = out_ptrs[blockIdx.y];
  detail::for_each_lanes(count, detail::aligned16(x, y, out), [&](auto width, std::int64_t i) {
    constexpr int W = decltype(width)::value;
    const detail::Lanes<float, W> xv = detail::load_lanes<W>(x, i);
    const detail::Lanes<float, W> yv = detail::load_lanes<W>(y, i);
    detail::Lanes<float, W> o;
#pragma unroll
    for (int l = 0; l < W; ++l) o.v[l] = __fadd_rn(xv.v[l], yv.v[l]);
    detail::store_lanes<W>(out, i, o);
  });
}

// Muon's eps on buf / (||buf||_F + eps) before the msign normalizer's Newton-Schulz (pion.cpp).
constexpr double kMsignEps = 1e-7;

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
    lie_ = o.momentum == PionMomentum::Lie;
    msign_ = o.normalizer == PionNormalizer::Msign;
    transported_ = o.momentum == PionMomentum::Transported;
    alternate_ = o.update_side == PionUpdateSide::Alternate;
    // The sides that ever rotate (pion.cpp's state_slots_for): a one-sided run keeps no
    // moments and forms no products for the other side; alternate keeps both.
    has_in_ = o.update_side != PionUpdateSide::Left;
    has_out_ = o.update_side != PionUpdateSide::Right;
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
      if (lie_) {
        g.m_in = detail::zeroed(has_in_ ? B * g.nn : 0);
        g.v_in = detail::zeroed(has_in_ && !msign_ ? B * g.nn : 0);
        g.m_out = detail::zeroed(has_out_ ? B * g.mm : 0);
        g.v_out = detail::zeroed(has_out_ && !msign_ ? B * g.mm : 0);
      } else {
        g.m_amb = detail::zeroed(B * g.mn);
        g.v_amb = detail::zeroed(B * g.mn);
      }
      g.a_in = DeviceArray<float>(B * g.nn);
      g.a_out = DeviceArray<float>(B * g.mm);
      g.p = DeviceArray<float>(B * g.mn);
      g.q = DeviceArray<float>(B * g.mn);
      g.partial = DeviceArray<double>(B * kBlocksPerMatrix);
      g.s = DeviceArray<float>(B);
      for (std::size_t b = 0; b < B; ++b) place(params[indices[b]].name, groups_.size() - 1, b);
      std::tie(g.w_ptrs, g.g_ptrs) = detail::value_and_grad_pointers(params, indices);
      for (const StateRef& r : state_refs(g))
        g.state_ptrs[r.key] = detail::slice_pointers(r.base, B, r.stride);
      g.a_in_ptrs = detail::slice_pointers(g.a_in.data(), B, g.nn);
      g.a_out_ptrs = detail::slice_pointers(g.a_out.data(), B, g.mm);
      g.p_ptrs = detail::slice_pointers(g.p.data(), B, g.mn);
      g.q_ptrs = detail::slice_pointers(g.q.data(), B, g.mn);
      if (msign_) {
        g.inv = DeviceArray<float>(B);
        if (has_in_) g.ns_in = NsScratch(B, g.nn);
        if (has_out_) g.ns_out = NsScratch(B, g.mm);
      }
      if (transported_) g.ones = DeviceArray<float>(std::vector<float>(B, 1.0f));
    }
  }

  std::string kind() const override { return "pion"; }

  HostState download_state(const std::string& name) const override {
    const auto [gi, b] = locate(name);
    HostState out;
    for (const StateRef& r : state_refs(groups_[gi]))
      out[r.key] = detail::download_slice(ctx_, r.base + b * r.stride, r.count);
    return out;
  }

  void upload_state(const std::string& name, const HostState& state) override {
    const auto [gi, b] = locate(name);
    const std::string who = this->who() + ": " + name;
    for (const StateRef& r : state_refs(groups_[gi]))
      detail::upload_slice(ctx_, r.base + b * r.stride, state, r.key, r.count, who);
  }

 private:
  // The msign normalizer's Newton-Schulz scratch for one side (d x d per matrix).
  struct NsScratch {
    NsScratch() = default;
    NsScratch(std::size_t batch, std::size_t stride)
        : x0(batch * stride), x1(batch * stride), gram(batch * stride), poly(batch * stride) {
      x[0] = detail::slice_pointers(x0.data(), batch, stride);
      x[1] = detail::slice_pointers(x1.data(), batch, stride);
      gram_ptrs = detail::slice_pointers(gram.data(), batch, stride);
      poly_ptrs = detail::slice_pointers(poly.data(), batch, stride);
    }
    DeviceArray<float> x0, x1, gram, poly;
    DevicePointers x[2], gram_ptrs, poly_ptrs;
  };

  struct Group {
    std::size_t m = 0, n = 0, batch = 0;               // d_out, d_in, matrices
    std::size_t nn = 0, mm = 0, mn = 0;                // slice strides (padded n*n, m*m, m*n)
    DeviceArray<float> m_in, v_in, m_out, v_out;       // lie state (the variant's slots only)
    DeviceArray<float> m_amb, v_amb;                   // ambient / transported state: m, v
    DeviceArray<float> a_in, a_out, p, q;              // scratch: X then A; P = A_out W, Q = W A_in
    DeviceArray<double> partial;                       // norm partial sums
    DeviceArray<float> s;                              // s = lr * alpha per matrix
    DeviceArray<float> inv, ones;                      // msign: 1 / norms; transported: s = 1
    NsScratch ns_in, ns_out;                           // msign
    std::map<std::string, DevicePointers> state_ptrs;  // by the CPU's slot key
    DevicePointers w_ptrs, g_ptrs, a_in_ptrs, a_out_ptrs, p_ptrs, q_ptrs;
  };

  // One state slot of a group under the CPU's key: slice b at base + b * stride, count values.
  struct StateRef {
    const char* key;
    float* base;
    std::size_t stride, count;
  };

  // The slots this variant keeps, as Pion::state_slots_for lists them (less sigma0, which
  // the training loop keeps on the host).
  std::vector<StateRef> state_refs(const Group& g) const {
    const std::size_t nn = g.n * g.n, mm = g.m * g.m;
    std::vector<StateRef> out;
    if (!lie_) {
      out.push_back({"m", g.m_amb.data(), g.mn, g.m * g.n});
      out.push_back({"v", g.v_amb.data(), g.mn, g.m * g.n});
      return out;
    }
    if (has_in_) {
      out.push_back({"m_in", g.m_in.data(), g.nn, nn});
      if (!msign_) out.push_back({"v_in", g.v_in.data(), g.nn, nn});
    }
    if (has_out_) {
      out.push_back({"m_out", g.m_out.data(), g.mm, mm});
      if (!msign_) out.push_back({"v_out", g.v_out.data(), g.mm, mm});
    }
    return out;
  }

  // Per shape group: the scaled directions (common to every retraction), then the
  // retraction that moves W along them (taylor2 is the only one on the GPU so far; another
  // retraction is a second retract_* beside retract_taylor2, chosen here). Transported
  // momentum then turns m with the same rotation.
  void queue_update() override {
    for (Group& g : groups_) {
      queue_directions(g);
      retract(g, g.w_ptrs, g.s.data());
      if (transported_) {
        // m <- L m R: P = (sA_out) m and Q = m (sA_in) with the already scaled directions,
        // so the retraction runs with s = 1.
        const auto m = static_cast<std::int64_t>(g.m), n = static_cast<std::int64_t>(g.n);
        const DevicePointers& M = g.state_ptrs.at("m");
        if (has_out_)
          detail::gemm_group(blas(), types_, false, false, m, n, m, 1.0f, g.a_out_ptrs, m, M, n,
                             0.0f, g.p_ptrs, n, g.batch, options_.strided_gemms);
        if (has_in_)
          detail::gemm_group(blas(), types_, false, false, m, n, n, 1.0f, M, n, g.a_in_ptrs, n,
                             0.0f, g.q_ptrs, n, g.batch, options_.strided_gemms);
        retract(g, M, g.ones.data());
      }
    }
  }

  void retract(Group& g, const DevicePointers& x, const float* s) {
    if (has_in_ && has_out_)
      retract_taylor2(g, x, s);  // both sides, and alternate (the idle side's A is 0 there)
    else
      retract_taylor2_one_side(g, x, s);
  }

  // Generators, moments and directions, then s = lr * alpha: leaves A_in <- s A_in,
  // A_out <- s A_out in g.a_in / g.a_out, P = A_out W and Q = W A_in (unscaled) in g.p / g.q
  // and s per matrix in g.s. A side that never rotates is neither formed nor scaled.
  void queue_directions(Group& g) {
    cudaStream_t st = stream();
    cublasHandle_t h = blas();
    const GemmTypes& types = types_;
    const auto m = static_cast<std::int64_t>(g.m), n = static_cast<std::int64_t>(g.n);
    const std::size_t B = g.batch;
    const CudaPionOptions& o = options_;
    const DevicePointers &W = g.w_ptrs, &G = g.g_ptrs, &Ain = g.a_in_ptrs, &Aout = g.a_out_ptrs,
                         &P = g.p_ptrs, &Q = g.q_ptrs;
    // Alternate: left (out) on odd applied steps, right (in) on even ones, as pion.cpp; the
    // side is chosen on the device (the step count lives there), so both are formed.
    const int in_parity = alternate_ ? 0 : -1, out_parity = alternate_ ? 1 : -1;

    if (!lie_) {
      // Ambient: m, v advance every step whichever side rotates; E = -D goes into P (free
      // until P = A_out W below), then A_in = skew(W^T E), A_out = skew(E W^T) (pion.cpp).
      const detail::AdamCoefficients k{
          static_cast<float>(o.beta1), static_cast<float>(1.0 - o.beta1),
          static_cast<float>(o.beta2), static_cast<float>(1.0 - o.beta2),
          static_cast<float>(o.eps)};
      detail::queue_ambient_moments(st, G, g.state_ptrs.at("m"), g.state_ptrs.at("v"), P, m * n, B,
                                    k, scalars());
      if (has_in_) {
        detail::gemm_group(h, types, true, false, n, n, m, 1.0f, W, n, P, n, 0.0f, Ain, n, B,
                           options_.strided_gemms);
        detail::queue_skew_in_place(st, Ain, n, B, scalars(), in_parity);
      }
      if (has_out_) {
        detail::gemm_group(h, types, false, true, m, m, n, 1.0f, P, n, W, n, 0.0f, Aout, m, B,
                           options_.strided_gemms);
        detail::queue_skew_in_place(st, Aout, m, B, scalars(), out_parity);
      }
    } else {
      // The GEMMs below read g, so the step's gradient scale (the clip) cannot ride on an
      // elementwise pass: g <- scale g in place first, a no-op unless scale != 1.
      detail::queue_scale_gradients(st, G, m * n, B, scalars());
      // Generators through one GEMM each (pion.cpp): X_in = W^T g is (n x m)(m x n) = n x n,
      // k = m; X_out = g W^T is (m x n)(n x m) = m x m, k = n. Row strides: W, g: n.
      if (has_in_)
        detail::gemm_group(h, types, true, false, n, n, m, 1.0f, W, n, G, n, 0.0f, Ain, n, B,
                           options_.strided_gemms);
      if (has_out_)
        detail::gemm_group(h, types, false, true, m, m, n, 1.0f, G, n, W, n, 0.0f, Aout, m, B,
                           options_.strided_gemms);
      if (msign_) {
        if (has_in_) queue_msign(g, Ain, g.state_ptrs.at("m_in"), g.ns_in, n, in_parity);
        if (has_out_) queue_msign(g, Aout, g.state_ptrs.at("m_out"), g.ns_out, m, out_parity);
      } else {
        // Skew parts, moments and directions, in place: Ain <- A_in, Aout <- A_out.
        const MomentCoefficients k{static_cast<float>(o.beta1), static_cast<float>(1.0 - o.beta1),
                                   static_cast<float>(o.beta2), static_cast<float>(1.0 - o.beta2),
                                   static_cast<float>(o.eps)};
        const dim3 tile_block(kTile, kTileRows);
        const auto tiles_n = static_cast<unsigned>((g.n + kTile - 1) / kTile);
        const auto tiles_m = static_cast<unsigned>((g.m + kTile - 1) / kTile);
        if (has_in_) {
          moments_and_direction<<<dim3(tiles_n, tiles_n, static_cast<unsigned>(B)), tile_block, 0,
                                  st>>>(Ain.as<float>(), g.state_ptrs.at("m_in").as<float>(),
                                        g.state_ptrs.at("v_in").as<float>(), static_cast<int>(n), k,
                                        scalars(), in_parity);
          PION_CUDA_CHECK_LAUNCH("pion moments (in)");
        }
        if (has_out_) {
          moments_and_direction<<<dim3(tiles_m, tiles_m, static_cast<unsigned>(B)), tile_block, 0,
                                  st>>>(Aout.as<float>(), g.state_ptrs.at("m_out").as<float>(),
                                        g.state_ptrs.at("v_out").as<float>(), static_cast<int>(m),
                                        k, scalars(), out_parity);
          PION_CUDA_CHECK_LAUNCH("pion moments (out)");
        }
      }
    }

    // P = A_out W: (m x m)(m x n), k = m, row strides m, n -> n.
    // Q = W A_in:  (m x n)(n x n), k = n, row strides n, n -> n.
    if (has_out_)
      detail::gemm_group(h, types, false, false, m, n, m, 1.0f, Aout, m, W, n, 0.0f, P, n, B,
                         options_.strided_gemms);
    if (has_in_)
      detail::gemm_group(h, types, false, false, m, n, n, 1.0f, W, n, Ain, n, 0.0f, Q, n, B,
                         options_.strided_gemms);
    // s = lr * alpha from ||P + Q||_F (one-sided: ||P|| or ||Q||), on the device.
    if (has_in_ && has_out_)
      detail::queue_sum_squares(st, P, &Q, m * n, B, g.partial.data());
    else
      detail::queue_sum_squares(st, has_out_ ? P : Q, nullptr, m * n, B, g.partial.data());
    const double c_sqrt_mn = o.c * std::sqrt(static_cast<double>(m) * static_cast<double>(n));
    step_scales<<<static_cast<unsigned>((B + 127) / 128), 128, 0, st>>>(
        g.partial.data(), static_cast<unsigned>(B), c_sqrt_mn, o.eps, scalars(), g.s.data());
    PION_CUDA_CHECK_LAUNCH("pion step scales");
    // A <- s A on the rotating sides, so E2(sA) = I + (sA) + (sA)^2/2 needs only constant
    // GEMM scalars (an idle side's scratch is left alone: count 0).
    const std::int64_t nn = has_in_ ? n * n : 0, mm = has_out_ ? m * m : 0;
    const unsigned in_blocks = detail::elementwise_blocks(nn);
    scale_directions<<<dim3(in_blocks + detail::elementwise_blocks(mm), static_cast<unsigned>(B)),
                       kThreads, 0, st>>>(Ain.as<float>(), nn, Aout.as<float>(), mm, in_blocks,
                                          g.s.data());
    PION_CUDA_CHECK_LAUNCH("pion scale directions");
  }

  // The msign normalizer on one side, X (the d x d product) in a: buf <- b1 buf + (1-b1)(X -
  // X^T), N = NS(buf), a <- -(N - N^T)/2 (pion.cpp's compute_directions).
  void queue_msign(Group& g, const DevicePointers& a, const DevicePointers& buf, NsScratch& ns,
                   std::int64_t d, int parity) {
    const CudaPionOptions& o = options_;
    detail::queue_skew_buffer(stream(), a, buf, d, g.batch, static_cast<float>(o.beta1),
                              static_cast<float>(1.0 - o.beta1), scalars(), parity);
    const int cur = detail::queue_newton_schulz_square(
        stream(), blas(), types_, buf, ns.x, ns.gram_ptrs, ns.poly_ptrs, d, g.batch, o.ns_steps,
        kMsignEps, g.partial.data(), g.inv.data());
    detail::queue_negated_skew_part(stream(), ns.x[cur], a, d, g.batch, scalars(), parity);
  }

  // X <- E2(sA_out) X E2(sA_in), E2(Y) = I + Y + Y^2/2, with A already scaled and P = A_out X,
  // Q = X A_in to be scaled by s here (W: s per matrix; transported m: s = 1).
  void retract_taylor2(Group& g, const DevicePointers& W, const float* s) {
    cudaStream_t st = stream();
    cublasHandle_t h = blas();
    const GemmTypes& types = types_;
    const auto m = static_cast<std::int64_t>(g.m), n = static_cast<std::int64_t>(g.n);
    const std::size_t B = g.batch;
    const dim3 grid = detail::elementwise_grid(m * n, B);
    const DevicePointers &Ain = g.a_in_ptrs, &Aout = g.a_out_ptrs, &P = g.p_ptrs, &Q = g.q_ptrs;
    // A means sA here. Every product below is m x n with row stride n; A_out has row stride
    // m and k = m, A_in row stride n and k = n.
    const std::int64_t count = m * n;
    if (m >= n) {
      // Left first (pion_math::taylor2_left_first, apply_taylor2):
      //   P <- sP;  Q <- LW = W + sP + (1/2)(sA_out)(sP)
      scale_then_add<<<grid, kThreads, 0, st>>>(W.as<float>(), P.as<float>(), Q.as<float>(), count,
                                                s);
      PION_CUDA_CHECK_LAUNCH("pion left: W + sP");
      detail::gemm_group(h, types, false, false, m, n, m, 0.5f, Aout, m, P, n, 1.0f, Q, n, B,
                         options_.strided_gemms);
      //   P <- R' = LW (sA_in) = sR;  W <- LW + sR + (1/2) (sR)(sA_in)
      detail::gemm_group(h, types, false, false, m, n, n, 1.0f, Q, n, Ain, n, 0.0f, P, n, B,
                         options_.strided_gemms);
      add<<<grid, kThreads, 0, st>>>(Q.as<float>(), P.as<float>(), W.as<float>(), count);
      PION_CUDA_CHECK_LAUNCH("pion left: LW + sR");
      detail::gemm_group(h, types, false, false, m, n, n, 0.5f, P, n, Ain, n, 1.0f, W, n, B,
                         options_.strided_gemms);
    } else {
      // Right first, the mirror image:
      //   Q <- sQ;  P <- WR = W + sQ + (1/2)(sQ)(sA_in)
      scale_then_add<<<grid, kThreads, 0, st>>>(W.as<float>(), Q.as<float>(), P.as<float>(), count,
                                                s);
      PION_CUDA_CHECK_LAUNCH("pion right: W + sQ");
      detail::gemm_group(h, types, false, false, m, n, n, 0.5f, Q, n, Ain, n, 1.0f, P, n, B,
                         options_.strided_gemms);
      //   Q <- L' = (sA_out) WR = sL;  W <- WR + sL + (1/2)(sA_out)(sL)
      detail::gemm_group(h, types, false, false, m, n, m, 1.0f, Aout, m, P, n, 0.0f, Q, n, B,
                         options_.strided_gemms);
      add<<<grid, kThreads, 0, st>>>(P.as<float>(), Q.as<float>(), W.as<float>(), count);
      PION_CUDA_CHECK_LAUNCH("pion right: WR + sL");
      detail::gemm_group(h, types, false, false, m, n, m, 0.5f, Aout, m, Q, n, 1.0f, W, n, B,
                         options_.strided_gemms);
    }
  }

  // One-sided E2 steps (pion_math::apply_taylor2_left / _right), in place in X:
  //   left:  P <- sP;  X <- X + sP;  X += (1/2)(sA_out)(sP)
  //   right: Q <- sQ;  X <- X + sQ;  X += (1/2)(sQ)(sA_in)
  void retract_taylor2_one_side(Group& g, const DevicePointers& W, const float* s) {
    cudaStream_t st = stream();
    cublasHandle_t h = blas();
    const auto m = static_cast<std::int64_t>(g.m), n = static_cast<std::int64_t>(g.n);
    const std::size_t B = g.batch;
    const DevicePointers& X = has_out_ ? g.p_ptrs : g.q_ptrs;
    scale_then_add<<<detail::elementwise_grid(m * n, B), kThreads, 0, st>>>(
        W.as<float>(), X.as<float>(), W.as<float>(), m * n, s);
    PION_CUDA_CHECK_LAUNCH("pion one side: W + sX");
    if (has_out_)
      detail::gemm_group(h, types_, false, false, m, n, m, 0.5f, g.a_out_ptrs, m, X, n, 1.0f, W, n,
                         B, options_.strided_gemms);
    else
      detail::gemm_group(h, types_, false, false, m, n, n, 0.5f, X, n, g.a_in_ptrs, n, 1.0f, W, n,
                         B, options_.strided_gemms);
  }

  CudaPionOptions options_;
  bool lie_ = true, msign_ = false, transported_ = false, alternate_ = false;
  bool has_in_ = true, has_out_ = true;  // whose products (and lie moments) exist
  GemmTypes types_{};
  std::vector<Group> groups_;
};

}  // namespace

std::unique_ptr<CudaOptimizer> make_cuda_pion(Context& ctx, std::vector<DeviceParam> params,
                                              const CudaPionOptions& options) {
  return std::make_unique<CudaPion>(ctx, std::move(params), options);
}

}  // namespace pion::cuda
