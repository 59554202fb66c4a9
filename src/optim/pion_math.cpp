#include "optim/pion_math.h"

#include <lapacke.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "pion/core/error.h"
#include "pion/core/linalg.h"

namespace pion::pion_math {

// Threading: the GEMMs run on OpenBLAS's threads; the elementwise passes here run on the
// calling thread on purpose. They are memory-bound (one core streams them nearly as fast as
// two), and an OpenMP region between GEMMs costs far more than it saves: after each region
// libgomp's idle workers spin (about 300k pause loops by default) on the cores OpenBLAS is
// about to use. On the 2-core dev machine a 768 x 768 step took 0.075 s with OpenMP
// passes here and 0.043 s without (0.047 s with OpenMP and OMP_WAIT_POLICY=PASSIVE).

template <class T>
void skew_from_product(const T* x, std::int64_t d, T* g) {
  for (std::int64_t i = 0; i < d; ++i)
    for (std::int64_t j = 0; j < d; ++j) g[i * d + j] = x[i * d + j] - x[j * d + i];
}

template <class T>
void skew_in_place(T* x, std::int64_t d) {
  for (std::int64_t i = 0; i < d; ++i) {
    x[i * d + i] = T(0);
    for (std::int64_t j = i + 1; j < d; ++j) {
      const T upper = x[i * d + j], lower = x[j * d + i];
      x[i * d + j] = upper - lower;
      x[j * d + i] = lower - upper;
    }
  }
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

// The moment pass works on kTile x kTile tiles so the transposed reads and mirrored writes
// stay in L1.
constexpr std::int64_t kTile = 32;

template <class T>
struct MomentRow {
  T b1, c1, b2, c2, eps;
  // One contiguous run: g is the generator, m and v the moments (updated in place), a the
  // direction -m / (sqrt(v) + eps).
  void operator()(const T* g, T* m, T* v, T* a, std::int64_t n) const {
    for (std::int64_t j = 0; j < n; ++j) {
      const T mj = b1 * m[j] + c1 * g[j];
      const T vj = b2 * v[j] + c2 * g[j] * g[j];
      m[j] = mj;
      v[j] = vj;
      a[j] = -mj / (std::sqrt(vj) + eps);
    }
  }
};

#if defined(__SSE2__)
// fp32 with SSE: GCC does not vectorise std::sqrt under the default -fmath-errno, and the
// sqrt and divide are most of this pass's arithmetic. The tail uses the single-lane forms
// of the same instructions, so every element is rounded the same way wherever it falls.
template <>
void MomentRow<float>::operator()(const float* g, float* m, float* v, float* a,
                                  std::int64_t n) const {
  const __m128 vb1 = _mm_set1_ps(b1), vc1 = _mm_set1_ps(c1), vb2 = _mm_set1_ps(b2),
               vc2 = _mm_set1_ps(c2), veps = _mm_set1_ps(eps), zero = _mm_setzero_ps();
  std::int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const __m128 gj = _mm_loadu_ps(g + j);
    const __m128 mj = _mm_add_ps(_mm_mul_ps(vb1, _mm_loadu_ps(m + j)), _mm_mul_ps(vc1, gj));
    const __m128 vj =
        _mm_add_ps(_mm_mul_ps(vb2, _mm_loadu_ps(v + j)), _mm_mul_ps(_mm_mul_ps(vc2, gj), gj));
    _mm_storeu_ps(m + j, mj);
    _mm_storeu_ps(v + j, vj);
    _mm_storeu_ps(a + j, _mm_div_ps(_mm_sub_ps(zero, mj), _mm_add_ps(_mm_sqrt_ps(vj), veps)));
  }
  for (; j < n; ++j) {
    const __m128 gj = _mm_load_ss(g + j);
    const __m128 mj = _mm_add_ss(_mm_mul_ss(vb1, _mm_load_ss(m + j)), _mm_mul_ss(vc1, gj));
    const __m128 vj =
        _mm_add_ss(_mm_mul_ss(vb2, _mm_load_ss(v + j)), _mm_mul_ss(_mm_mul_ss(vc2, gj), gj));
    _mm_store_ss(m + j, mj);
    _mm_store_ss(v + j, vj);
    _mm_store_ss(a + j, _mm_div_ss(_mm_sub_ss(zero, mj), _mm_add_ss(_mm_sqrt_ss(vj), veps)));
  }
}
#endif

// dst = src^T (negated when `negate`) for an r x c block of src (row stride lds) into a
// c x r block of dst (row stride ldd). Negation flips the sign bit, exactly like unary minus.
template <class T>
void transpose_block(const T* src, std::int64_t lds, T* dst, std::int64_t ldd, std::int64_t r,
                     std::int64_t c, bool negate) {
  for (std::int64_t i = 0; i < r; ++i)
    for (std::int64_t j = 0; j < c; ++j)
      dst[j * ldd + i] = negate ? -src[i * lds + j] : src[i * lds + j];
}

#if defined(__SSE2__)
// fp32: 4 x 4 blocks through SSE shuffles; the scalar edges use the generic loop.
template <>
void transpose_block<float>(const float* src, std::int64_t lds, float* dst, std::int64_t ldd,
                            std::int64_t r, std::int64_t c, bool negate) {
  const __m128 sign = _mm_set1_ps(negate ? -0.0f : 0.0f);
  const std::int64_t r4 = r & ~std::int64_t{3}, c4 = c & ~std::int64_t{3};
  for (std::int64_t i = 0; i < r4; i += 4)
    for (std::int64_t j = 0; j < c4; j += 4) {
      __m128 row0 = _mm_loadu_ps(src + i * lds + j), row1 = _mm_loadu_ps(src + (i + 1) * lds + j);
      __m128 row2 = _mm_loadu_ps(src + (i + 2) * lds + j),
             row3 = _mm_loadu_ps(src + (i + 3) * lds + j);
      _MM_TRANSPOSE4_PS(row0, row1, row2, row3);
      _mm_storeu_ps(dst + j * ldd + i, _mm_xor_ps(row0, sign));
      _mm_storeu_ps(dst + (j + 1) * ldd + i, _mm_xor_ps(row1, sign));
      _mm_storeu_ps(dst + (j + 2) * ldd + i, _mm_xor_ps(row2, sign));
      _mm_storeu_ps(dst + (j + 3) * ldd + i, _mm_xor_ps(row3, sign));
    }
  if (c4 < c) {
    for (std::int64_t i = 0; i < r; ++i)
      for (std::int64_t j = c4; j < c; ++j)
        dst[j * ldd + i] = negate ? -src[i * lds + j] : src[i * lds + j];
  }
  if (r4 < r) {
    for (std::int64_t i = r4; i < r; ++i)
      for (std::int64_t j = 0; j < c4; ++j)
        dst[j * ldd + i] = negate ? -src[i * lds + j] : src[i * lds + j];
  }
}
#endif

}  // namespace

template <class T>
void update_moments_and_direction(T* x, T* m, T* v, std::int64_t d, const MomentCoefficients& k) {
  const MomentRow<T> row{T(k.beta1), T(1.0 - k.beta1), T(k.beta2), T(1.0 - k.beta2), T(k.eps)};
  const std::int64_t tiles = (d + kTile - 1) / kTile;
  T lower_t[kTile * kTile], g[kTile];
  // Tile pairs (I, J), I <= J. The upper tile is computed, the lower one written as its
  // mirror (A and m negated, v copied): half the arithmetic, and exact skew symmetry
  // whatever the rounding. The update of a lower element would equal its mirror anyway,
  // because Pion's m is exactly skew and v exactly symmetric from the first step on.
  for (std::int64_t ti = 0; ti < tiles; ++ti) {
    for (std::int64_t tj = ti; tj < tiles; ++tj) {
      const std::int64_t i0 = ti * kTile, j0 = tj * kTile;
      const std::int64_t ni = std::min(kTile, d - i0), nj = std::min(kTile, d - j0);
      // X[J, I]^T, read before X is overwritten; then G = X - X^T row by row.
      transpose_block(x + j0 * d + i0, d, lower_t, nj, nj, ni, false);
      for (std::int64_t a = 0; a < ni; ++a) {
        const std::int64_t off = (i0 + a) * d + j0;
        for (std::int64_t b = 0; b < nj; ++b) g[b] = x[off + b] - lower_t[a * nj + b];
        row(g, m + off, v + off, x + off, nj);
      }
      if (ti != tj) {  // mirror the whole upper tile into the lower one
        transpose_block(x + i0 * d + j0, d, x + j0 * d + i0, d, ni, nj, true);
        transpose_block(m + i0 * d + j0, d, m + j0 * d + i0, d, ni, nj, true);
        transpose_block(v + i0 * d + j0, d, v + j0 * d + i0, d, ni, nj, false);
        continue;
      }
      // A diagonal tile mirrors onto itself: only below its diagonal.
      for (std::int64_t b = 1; b < nj; ++b)
        for (std::int64_t a = 0; a < b; ++a) {
          const std::int64_t lower = (j0 + b) * d + i0 + a, upper = (i0 + a) * d + j0 + b;
          x[lower] = -x[upper];
          m[lower] = -m[upper];
          v[lower] = v[upper];
        }
    }
  }
}

template <class T>
void update_skew_buffer(const T* x, T* buf, std::int64_t d, double beta) {
  const T b = T(beta), c = T(1.0 - beta);
  for (std::int64_t i = 0; i < d; ++i)
    for (std::int64_t j = 0; j < d; ++j)
      buf[i * d + j] = b * buf[i * d + j] + c * (x[i * d + j] - x[j * d + i]);
}

template <class T>
void negated_skew_part(const T* n, std::int64_t d, T* a) {
  for (std::int64_t i = 0; i < d; ++i)
    for (std::int64_t j = 0; j < d; ++j) a[i * d + j] = (n[j * d + i] - n[i * d + j]) / T(2);
}

template <class T>
void update_ambient_moments(const T* g, T* m, T* v, T* e, std::int64_t count,
                            const MomentCoefficients& k) {
  const MomentRow<T> row{T(k.beta1), T(1.0 - k.beta1), T(k.beta2), T(1.0 - k.beta2), T(k.eps)};
  row(g, m, v, e, count);
}

template <class T>
double frobenius_norm(const T* p, std::int64_t count) {
  double sum = 0.0;
#pragma omp simd reduction(+ : sum)
  for (std::int64_t i = 0; i < count; ++i) sum += static_cast<double>(p[i]) * p[i];
  return std::sqrt(sum);
}

template <class T>
double norm_of_sum(const T* p, const T* q, std::int64_t count) {
  double sum = 0.0;
  // simd reduction: partial sums per lane (no threads), deterministic for a given build.
#pragma omp simd reduction(+ : sum)
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

template <class T>
void apply_taylor2_left(T* w, std::int64_t d_out, std::int64_t d_in, const T* a_out, const T* p,
                        T s) {
  const std::int64_t m = d_out, n = d_in;
  add_scaled(w, p, s, w, m * n);
  gemm<T>(Trans::N, Trans::N, m, n, m, s * s / T(2), a_out, m, p, n, T(1), w, n);
}

template <class T>
void apply_taylor2_right(T* w, std::int64_t d_out, std::int64_t d_in, const T* a_in, const T* q,
                         T s) {
  const std::int64_t m = d_out, n = d_in;
  add_scaled(w, q, s, w, m * n);
  gemm<T>(Trans::N, Trans::N, m, n, n, s * s / T(2), q, n, a_in, n, T(1), w, n);
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

template <class T>
void apply_left_factor(T* w, std::int64_t d_out, std::int64_t d_in, const T* f_out, T* tmp) {
  const std::int64_t m = d_out, n = d_in;
  gemm<T>(Trans::N, Trans::N, m, n, m, T(1), f_out, m, w, n, T(0), tmp, n);
  std::memcpy(w, tmp, sizeof(T) * static_cast<std::size_t>(m * n));
}

template <class T>
void apply_right_factor(T* w, std::int64_t d_out, std::int64_t d_in, const T* f_in, T* tmp) {
  const std::int64_t m = d_out, n = d_in;
  gemm<T>(Trans::N, Trans::N, m, n, n, T(1), w, n, f_in, n, T(0), tmp, n);
  std::memcpy(w, tmp, sizeof(T) * static_cast<std::size_t>(m * n));
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
  template void apply_factors<T>(T*, std::int64_t, std::int64_t, const T*, const T*, T*);        \
  template void skew_in_place<T>(T*, std::int64_t);                                               \
  template void update_skew_buffer<T>(const T*, T*, std::int64_t, double);                        \
  template void negated_skew_part<T>(const T*, std::int64_t, T*);                                 \
  template void update_ambient_moments<T>(const T*, T*, T*, T*, std::int64_t,                     \
                                          const MomentCoefficients&);                             \
  template double frobenius_norm<T>(const T*, std::int64_t);                                      \
  template void apply_taylor2_left<T>(T*, std::int64_t, std::int64_t, const T*, const T*, T);     \
  template void apply_taylor2_right<T>(T*, std::int64_t, std::int64_t, const T*, const T*, T);    \
  template void apply_left_factor<T>(T*, std::int64_t, std::int64_t, const T*, T*);               \
  template void apply_right_factor<T>(T*, std::int64_t, std::int64_t, const T*, T*);

PION_MATH_INSTANTIATE(float)
PION_MATH_INSTANTIATE(double)

}  // namespace pion::pion_math
