#include "optim/pion_math.h"

#include <lapacke.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "pion/core/error.h"
#include "pion/core/linalg.h"

namespace pion::pion_math {

namespace {
// Below this many elements an OpenMP region costs more than it saves (waking a thread can
// take a scheduler time slice on a busy machine), so small matrices run on one thread.
constexpr std::int64_t kParallelMin = 1 << 15;
}  // namespace

template <class T>
void skew_from_product(const T* x, std::int64_t d, T* g) {
#pragma omp parallel for schedule(static) if (d * d >= kParallelMin)
  for (std::int64_t i = 0; i < d; ++i)
    for (std::int64_t j = 0; j < d; ++j) g[i * d + j] = x[i * d + j] - x[j * d + i];
}

template <class T>
void input_generator(const T* w, const T* grad, std::int64_t d_out, std::int64_t d_in, T* g_in) {
  std::vector<T> x(static_cast<std::size_t>(d_in * d_in));
  gemm<T>(Trans::T, Trans::N, d_in, d_in, d_out, T(1), w, d_in, grad, d_in, T(0), x.data(), d_in);
  skew_from_product(x.data(), d_in, g_in);
}

template <class T>
void output_generator(const T* w, const T* grad, std::int64_t d_out, std::int64_t d_in, T* g_out) {
  std::vector<T> x(static_cast<std::size_t>(d_out * d_out));
  gemm<T>(Trans::N, Trans::T, d_out, d_out, d_in, T(1), grad, d_in, w, d_in, T(0), x.data(), d_out);
  skew_from_product(x.data(), d_out, g_out);
}

namespace {

// Tiles of the moment pass: four kTile^2 local arrays per thread stay in L1/L2.
constexpr std::int64_t kTile = 32;

template <class T>
struct MomentRow {
  T b1, c1, b2, c2, eps;
  // One contiguous run of elements: g is the generator, m, v, x the state and output rows.
  void operator()(const T* g, T* m, T* v, T* x, std::int64_t n) const {
    for (std::int64_t j = 0; j < n; ++j) {
      const T mj = b1 * m[j] + c1 * g[j];
      const T vj = b2 * v[j] + c2 * g[j] * g[j];
      m[j] = mj;
      v[j] = vj;
      x[j] = -mj / (std::sqrt(vj) + eps);
    }
  }
};

}  // namespace

template <class T>
void update_moments_and_direction(T* x, T* m, T* v, std::int64_t d, const MomentCoefficients& k) {
  const MomentRow<T> row{T(k.beta1), T(1.0 - k.beta1), T(k.beta2), T(1.0 - k.beta2), T(k.eps)};
  const std::int64_t tiles = (d + kTile - 1) / kTile;
  // Tile pair (I, J), I <= J: read X[I, J] and X[J, I] into local arrays first, so X can be
  // overwritten with A in place; both tiles then stream contiguously through m, v and x.
#pragma omp parallel for schedule(dynamic, 1) if (d * d >= kParallelMin)
  for (std::int64_t ti = 0; ti < tiles; ++ti) {
    T upper[kTile * kTile], lower[kTile * kTile];  // X[I, J] (ni x nj), X[J, I] (nj x ni)
    T g_upper[kTile * kTile], g_lower[kTile * kTile];
    for (std::int64_t tj = ti; tj < tiles; ++tj) {
      const std::int64_t i0 = ti * kTile, j0 = tj * kTile;
      const std::int64_t ni = std::min(kTile, d - i0), nj = std::min(kTile, d - j0);
      for (std::int64_t a = 0; a < ni; ++a)
        std::memcpy(upper + a * nj, x + (i0 + a) * d + j0,
                    sizeof(T) * static_cast<std::size_t>(nj));
      for (std::int64_t b = 0; b < nj; ++b)
        std::memcpy(lower + b * ni, x + (j0 + b) * d + i0,
                    sizeof(T) * static_cast<std::size_t>(ni));
      for (std::int64_t a = 0; a < ni; ++a)
        for (std::int64_t b = 0; b < nj; ++b) {
          g_upper[a * nj + b] = upper[a * nj + b] - lower[b * ni + a];
          g_lower[b * ni + a] = lower[b * ni + a] - upper[a * nj + b];
        }
      for (std::int64_t a = 0; a < ni; ++a) {
        const std::int64_t off = (i0 + a) * d + j0;
        row(g_upper + a * nj, m + off, v + off, x + off, nj);
      }
      if (ti == tj) continue;  // a diagonal tile is its own mirror: done above
      for (std::int64_t b = 0; b < nj; ++b) {
        const std::int64_t off = (j0 + b) * d + i0;
        row(g_lower + b * ni, m + off, v + off, x + off, ni);
      }
    }
  }
}

template <class T>
double norm_of_sum(const T* p, const T* q, std::int64_t count) {
  double sum = 0.0;
#pragma omp parallel for reduction(+ : sum) schedule(static) if (count >= kParallelMin)
  for (std::int64_t i = 0; i < count; ++i) {
    const double e = static_cast<double>(p[i]) + static_cast<double>(q[i]);
    sum += e * e;
  }
  return std::sqrt(sum);
}

double step_scale(double c, std::int64_t d_out, std::int64_t d_in, double first_order_norm,
                  double eps) {
  return c * std::sqrt(static_cast<double>(d_out) * static_cast<double>(d_in)) /
         (first_order_norm + eps);
}

bool taylor2_left_first(std::int64_t d_out, std::int64_t d_in) {
  return d_out >= d_in;
}

namespace {
// out = a + s * b, elementwise over count values.
template <class T>
void add_scaled(const T* a, const T* b, T s, T* out, std::int64_t count) {
#pragma omp parallel for schedule(static) if (count >= kParallelMin)
  for (std::int64_t i = 0; i < count; ++i) out[i] = a[i] + s * b[i];
}
}  // namespace

template <class T>
void apply_taylor2(T* w, std::int64_t d_out, std::int64_t d_in, const T* a_out, const T* a_in, T* p,
                   T* q, T s, bool left_first) {
  const std::int64_t m = d_out, n = d_in, count = m * n;
  const T half_s2 = s * s / T(2);
  if (left_first) {
    // q <- LW = W + s P + (s^2/2) A_out P
    add_scaled(w, p, s, q, count);
    gemm<T>(Trans::N, Trans::N, m, n, m, half_s2, a_out, m, p, n, T(1), q, n);
    // p <- R = LW A_in;  W <- LW + s R + (s^2/2) R A_in
    gemm<T>(Trans::N, Trans::N, m, n, n, T(1), q, n, a_in, n, T(0), p, n);
    add_scaled(q, p, s, w, count);
    gemm<T>(Trans::N, Trans::N, m, n, n, half_s2, p, n, a_in, n, T(1), w, n);
  } else {
    // p <- WR = W + s Q + (s^2/2) Q A_in
    add_scaled(w, q, s, p, count);
    gemm<T>(Trans::N, Trans::N, m, n, n, half_s2, q, n, a_in, n, T(1), p, n);
    // q <- L = A_out WR;  W <- WR + s L + (s^2/2) A_out L
    gemm<T>(Trans::N, Trans::N, m, n, m, T(1), a_out, m, p, n, T(0), q, n);
    add_scaled(p, q, s, w, count);
    gemm<T>(Trans::N, Trans::N, m, n, m, half_s2, a_out, m, q, n, T(1), w, n);
  }
}

namespace {

template <class T>
void add_identity(T* a, std::int64_t d) {
  for (std::int64_t i = 0; i < d; ++i) a[i * d + i] += T(1);
}

template <class T>
void taylor2_factor(const T* a, std::int64_t d, T s, T* out) {
  gemm<T>(Trans::N, Trans::N, d, d, d, s * s / T(2), a, d, a, d, T(0), out, d);
  const std::int64_t count = d * d;
  for (std::int64_t i = 0; i < count; ++i) out[i] += s * a[i];
  add_identity(out, d);
}

// Cayley F = (I - B)^-1 (I + B), B = sA/2, computed as F = I + (I - B)^-1 2B: the solve
// then carries rounding relative to the small correction, not to I, which keeps F
// orthogonal to fp32 roundoff (solving for (I + B) directly drifts the spectrum about 30x
// faster in fp32). A row-major buffer read column-major is the transpose, and I - B
// commutes with B, so the column-major solve (I - B)^T Y = (2B)^T leaves the row-major
// (I - B)^-1 2B in place, with no copies.
template <class T>
void cayley_factor(const T* a, std::int64_t d, T s, T* out, std::vector<T>& work) {
  const std::int64_t count = d * d;
  work.resize(static_cast<std::size_t>(count));
  T* lhs = work.data();
  const T half = s / T(2);
  for (std::int64_t i = 0; i < count; ++i) {
    lhs[i] = -half * a[i];
    out[i] = T(2) * half * a[i];
  }
  add_identity(lhs, d);
  std::vector<lapack_int> pivots(static_cast<std::size_t>(d));
  const auto n = static_cast<lapack_int>(d);
  lapack_int info;
  if constexpr (std::is_same_v<T, float>)
    info = LAPACKE_sgesv(LAPACK_COL_MAJOR, n, n, lhs, n, pivots.data(), out, n);
  else
    info = LAPACKE_dgesv(LAPACK_COL_MAJOR, n, n, lhs, n, pivots.data(), out, n);
  check(info == 0, "pion: the Cayley system I - sA/2 is singular (LAPACK gesv info " +
                       std::to_string(info) + "); the direction A is not skew or holds NaN");
  add_identity(out, d);
}

// exp(sA) by scaling and squaring: B = sA / 2^k with ||B||_1 <= 1/2, a Taylor polynomial
// of degree q by Horner's rule, then k squarings. The truncation error is below
// 0.5^(q+1) / (q+1)!: 5e-9 for q = 8 (under fp32's 6e-8 roundoff), 2e-17 for q = 14.
template <class T>
void exp_factor(const T* a, std::int64_t d, T s, T* out, std::vector<T>& work) {
  constexpr int degree = std::is_same_v<T, float> ? 8 : 14;
  constexpr double theta = 0.5;
  const std::int64_t count = d * d;
  work.resize(static_cast<std::size_t>(2 * count));
  T* b = work.data();
  T* other = work.data() + count;
  double norm1 = 0.0;  // max column sum of |sA|
  for (std::int64_t j = 0; j < d; ++j) {
    double col = 0.0;
    for (std::int64_t i = 0; i < d; ++i) col += std::abs(static_cast<double>(s) * a[i * d + j]);
    norm1 = std::max(norm1, col);
  }
  check(std::isfinite(norm1), "pion: exp retraction got a non-finite direction");
  const int squarings = norm1 > theta ? static_cast<int>(std::ceil(std::log2(norm1 / theta))) : 0;
  const T scale = static_cast<T>(static_cast<double>(s) / std::ldexp(1.0, squarings));
  for (std::int64_t i = 0; i < count; ++i) b[i] = scale * a[i];
  // H = I + B/q, then H <- I + (B H) / j for j = q-1 .. 1.
  T* cur = out;
  for (std::int64_t i = 0; i < count; ++i) cur[i] = b[i] / T(degree);
  add_identity(cur, d);
  for (int j = degree - 1; j >= 1; --j) {
    gemm<T>(Trans::N, Trans::N, d, d, d, T(1) / T(j), b, d, cur, d, T(0), other, d);
    add_identity(other, d);
    std::swap(cur, other);
  }
  for (int k = 0; k < squarings; ++k) {
    gemm<T>(Trans::N, Trans::N, d, d, d, T(1), cur, d, cur, d, T(0), other, d);
    std::swap(cur, other);
  }
  if (cur != out) std::memcpy(out, cur, sizeof(T) * static_cast<std::size_t>(count));
}

}  // namespace

template <class T>
void retraction_factor(Retraction r, const T* a, std::int64_t d, T s, T* out,
                       std::vector<T>& work) {
  switch (r) {
    case Retraction::Taylor2:
      taylor2_factor(a, d, s, out);
      return;
    case Retraction::Cayley:
      cayley_factor(a, d, s, out, work);
      return;
    case Retraction::Exp:
      exp_factor(a, d, s, out, work);
      return;
  }
}

template <class T>
void apply_factors(T* w, std::int64_t d_out, std::int64_t d_in, const T* f_out, const T* f_in,
                   T* tmp) {
  const std::int64_t m = d_out, n = d_in;
  gemm<T>(Trans::N, Trans::N, m, n, m, T(1), f_out, m, w, n, T(0), tmp, n);
  gemm<T>(Trans::N, Trans::N, m, n, n, T(1), tmp, n, f_in, n, T(0), w, n);
}

#define PION_MATH_INSTANTIATE(T)                                                                  \
  template void skew_from_product<T>(const T*, std::int64_t, T*);                                 \
  template void input_generator<T>(const T*, const T*, std::int64_t, std::int64_t, T*);           \
  template void output_generator<T>(const T*, const T*, std::int64_t, std::int64_t, T*);          \
  template void update_moments_and_direction<T>(T*, T*, T*, std::int64_t,                         \
                                                const MomentCoefficients&);                       \
  template double norm_of_sum<T>(const T*, const T*, std::int64_t);                               \
  template void apply_taylor2<T>(T*, std::int64_t, std::int64_t, const T*, const T*, T*, T*, T,   \
                                 bool);                                                           \
  template void retraction_factor<T>(Retraction, const T*, std::int64_t, T, T*, std::vector<T>&); \
  template void apply_factors<T>(T*, std::int64_t, std::int64_t, const T*, const T*, T*);

PION_MATH_INSTANTIATE(float)
PION_MATH_INSTANTIATE(double)

}  // namespace pion::pion_math
