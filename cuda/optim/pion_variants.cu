// The kernels of Pion's variants (cuda/optim/pion_variants.cuh). Elementwise passes use the
// CPU's operation order without FMA contraction (__f*_rn), as pion_cuda.cu's moment pass does.
#include "pion_variants.cuh"

namespace pion::cuda::detail {
namespace {

// The same quintic coefficients as Muon (muon.cpp, muon_cuda.cu).
constexpr float kNsA = 3.4445f;
constexpr float kNsB = -4.7750f;
constexpr float kNsC = 2.0315f;

__device__ inline bool idle(const StepScalars* scalars, int parity) {
  return scalars->bad_grad != 0 || (parity >= 0 && static_cast<int>(scalars->steps & 1) != parity);
}

// Grid elementwise_grid; float4s when the four arrays are 16-byte aligned. g is read times
// the step's gradient scale (rounded to float, as a clip pass over g would leave it).
__global__ void ambient_moments(float* const* g_ptrs, float* const* m_ptrs, float* const* v_ptrs,
                                float* const* e_ptrs, std::int64_t count, AdamCoefficients k,
                                const StepScalars* scalars) {
  const float* g = g_ptrs[blockIdx.y];
  float* m = m_ptrs[blockIdx.y];
  float* v = v_ptrs[blockIdx.y];
  float* e = e_ptrs[blockIdx.y];
  const bool skip = scalars->bad_grad != 0;
  const float scale = scalars->grad_scale;
  for_each_lanes(count, aligned16(g, m, v, e), [&](auto width, std::int64_t i) {
    constexpr int W = decltype(width)::value;
    Lanes<float, W> ev{};
    if (!skip) {
      const Lanes<float, W> gv = load_lanes<W>(g, i);
      Lanes<float, W> mv = load_lanes<W>(m, i);
      Lanes<float, W> vv = load_lanes<W>(v, i);
#pragma unroll
      for (int l = 0; l < W; ++l) {
        const float gi = __fmul_rn(gv.v[l], scale);
        const float mi = __fadd_rn(__fmul_rn(k.b1, mv.v[l]), __fmul_rn(k.c1, gi));
        const float vi = __fadd_rn(__fmul_rn(k.b2, vv.v[l]), __fmul_rn(__fmul_rn(k.c2, gi), gi));
        mv.v[l] = mi;
        vv.v[l] = vi;
        ev.v[l] = __fdiv_rn(-mi, __fadd_rn(__fsqrt_rn(vi), k.eps));
      }
      store_lanes<W>(m, i, mv);
      store_lanes<W>(v, i, vv);
    }
    store_lanes<W>(e, i, ev);
  });
}

// One thread per element (i, j) with i <= j writes both (i, j) and (j, i): no two threads
// touch the same element, so the pass is in place.
__global__ void skew_in_place(float* const* x_ptrs, std::int64_t d, const StepScalars* scalars,
                              int parity) {
  float* x = x_ptrs[blockIdx.y];
  const bool zero = idle(scalars, parity);
  for (std::int64_t at = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
       at < d * d; at += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t i = at / d, j = at % d;
    if (j < i) continue;
    if (zero || i == j) {
      x[i * d + j] = 0.0f;
      x[j * d + i] = 0.0f;
      continue;
    }
    const float upper = x[i * d + j], lower = x[j * d + i];
    x[i * d + j] = __fsub_rn(upper, lower);
    x[j * d + i] = __fsub_rn(lower, upper);
  }
}

__global__ void skew_buffer(float* const* x_ptrs, float* const* buf_ptrs, std::int64_t d, float b,
                            float c, const StepScalars* scalars, int parity) {
  if (idle(scalars, parity)) return;
  const float* x = x_ptrs[blockIdx.y];
  float* buf = buf_ptrs[blockIdx.y];
  for (std::int64_t at = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
       at < d * d; at += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t i = at / d, j = at % d;
    buf[at] = __fadd_rn(__fmul_rn(b, buf[at]), __fmul_rn(c, __fsub_rn(x[at], x[j * d + i])));
  }
}

__global__ void negated_skew_part(float* const* n_ptrs, float* const* a_ptrs, std::int64_t d,
                                  const StepScalars* scalars, int parity) {
  const float* n = n_ptrs[blockIdx.y];
  float* a = a_ptrs[blockIdx.y];
  const bool zero = idle(scalars, parity);
  for (std::int64_t at = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
       at < d * d; at += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t i = at / d, j = at % d;
    a[at] = zero ? 0.0f : __fdiv_rn(__fsub_rn(n[j * d + i], n[at]), 2.0f);
  }
}

// inv[b] = 1 / (||X_b||_F + eps) in double, rounded to float (muon_cuda.cu's inverse_norms).
__global__ void inverse_norms(const double* partial, unsigned batch, double eps, float* inv) {
  const unsigned b = blockIdx.x * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  inv[b] = static_cast<float>(1.0 / (norm_from_partials(partial, b) + eps));
}

// Grid elementwise_grid.
__global__ void scale_into(float* const* x_ptrs, float* const* out_ptrs, std::int64_t count,
                           const float* inv) {
  const float* x = x_ptrs[blockIdx.y];
  float* out = out_ptrs[blockIdx.y];
  const float s = inv[blockIdx.y];
  for_each_lanes(count, aligned16(x, out), [&](auto width, std::int64_t i) {
    constexpr int W = decltype(width)::value;
    Lanes<float, W> v = load_lanes<W>(x, i);
#pragma unroll
    for (int l = 0; l < W; ++l) v.v[l] = __fmul_rn(v.v[l], s);
    store_lanes<W>(out, i, v);
  });
}

// Grid elementwise_grid.
__global__ void copy(float* const* x_ptrs, float* const* out_ptrs, std::int64_t count) {
  const float* x = x_ptrs[blockIdx.y];
  float* out = out_ptrs[blockIdx.y];
  for_each_lanes(count, aligned16(x, out), [&](auto width, std::int64_t i) {
    constexpr int W = decltype(width)::value;
    store_lanes<W>(out, i, load_lanes<W>(x, i));
  });
}

void copy_group(cudaStream_t st, const DevicePointers& x, const DevicePointers& out,
                std::int64_t count, std::size_t batch) {
  copy<<<elementwise_grid(count, batch), kThreads, 0, st>>>(x.as<float>(), out.as<float>(), count);
  PION_CUDA_CHECK_LAUNCH("pion msign copy");
}

}  // namespace

void queue_ambient_moments(cudaStream_t st, const DevicePointers& g, const DevicePointers& m,
                           const DevicePointers& v, const DevicePointers& e, std::int64_t count,
                           std::size_t batch, const AdamCoefficients& k,
                           const StepScalars* scalars) {
  ambient_moments<<<elementwise_grid(count, batch), kThreads, 0, st>>>(
      g.as<float>(), m.as<float>(), v.as<float>(), e.as<float>(), count, k, scalars);
  PION_CUDA_CHECK_LAUNCH("pion ambient moments");
}

void queue_skew_in_place(cudaStream_t st, const DevicePointers& x, std::int64_t d,
                         std::size_t batch, const StepScalars* scalars, int parity) {
  skew_in_place<<<elementwise_grid(d * d, batch), kThreads, 0, st>>>(x.as<float>(), d, scalars,
                                                                     parity);
  PION_CUDA_CHECK_LAUNCH("pion skew in place");
}

void queue_skew_buffer(cudaStream_t st, const DevicePointers& x, const DevicePointers& buf,
                       std::int64_t d, std::size_t batch, float b, float c,
                       const StepScalars* scalars, int parity) {
  skew_buffer<<<elementwise_grid(d * d, batch), kThreads, 0, st>>>(x.as<float>(), buf.as<float>(),
                                                                   d, b, c, scalars, parity);
  PION_CUDA_CHECK_LAUNCH("pion msign buffer");
}

void queue_negated_skew_part(cudaStream_t st, const DevicePointers& n, const DevicePointers& a,
                             std::int64_t d, std::size_t batch, const StepScalars* scalars,
                             int parity) {
  negated_skew_part<<<elementwise_grid(d * d, batch), kThreads, 0, st>>>(
      n.as<float>(), a.as<float>(), d, scalars, parity);
  PION_CUDA_CHECK_LAUNCH("pion negated skew part");
}

int queue_newton_schulz_square(cudaStream_t st, cublasHandle_t h, const GemmTypes& types,
                               const DevicePointers& buf, const DevicePointers (&x)[2],
                               const DevicePointers& gram, const DevicePointers& poly,
                               std::int64_t d, std::size_t batch, int steps, double eps,
                               double* partial, float* inv) {
  const std::int64_t count = d * d;
  queue_sum_squares(st, buf, nullptr, count, batch, partial);
  inverse_norms<<<static_cast<unsigned>((batch + 127) / 128), 128, 0, st>>>(
      partial, static_cast<unsigned>(batch), eps, inv);
  PION_CUDA_CHECK_LAUNCH("pion msign inverse norms");
  scale_into<<<elementwise_grid(count, batch), kThreads, 0, st>>>(buf.as<float>(), x[0].as<float>(),
                                                                  count, inv);
  PION_CUDA_CHECK_LAUNCH("pion msign normalise");
  // Square: muon_cuda.cu's wide branch. A = X X^T; B = b A + c A A; X' = a X + B X.
  int cur = 0;
  for (int step = 0; step < steps; ++step) {
    const DevicePointers& xc = x[cur];
    const DevicePointers& xn = x[1 - cur];
    gemm_group(h, types, false, true, d, d, d, 1.0f, xc, d, xc, d, 0.0f, gram, d, batch);
    // poly <- A, then poly <- c A A + b poly; x_next <- X, then x_next <- B X + a x_next.
    copy_group(st, gram, poly, count, batch);
    gemm_group(h, types, false, false, d, d, d, kNsC, gram, d, gram, d, kNsB, poly, d, batch);
    copy_group(st, xc, xn, count, batch);
    gemm_group(h, types, false, false, d, d, d, 1.0f, poly, d, xc, d, kNsA, xn, d, batch);
    cur = 1 - cur;
  }
  return cur;
}

}  // namespace pion::cuda::detail
