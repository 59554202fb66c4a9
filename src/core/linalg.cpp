#include "pion/core/linalg.h"

#include <cblas.h>
#include <lapacke.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "pion/core/error.h"

namespace pion {

namespace {
CBLAS_TRANSPOSE cblas_trans(Trans t) { return t == Trans::N ? CblasNoTrans : CblasTrans; }
}  // namespace

template <>
void gemm<float>(Trans ta, Trans tb, std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
                 const float* a, std::int64_t lda, const float* b, std::int64_t ldb, float beta,
                 float* c, std::int64_t ldc) {
  if (m == 0 || n == 0) return;
  cblas_sgemm(CblasRowMajor, cblas_trans(ta), cblas_trans(tb), static_cast<blasint>(m),
              static_cast<blasint>(n), static_cast<blasint>(k), alpha, a, static_cast<blasint>(lda),
              b, static_cast<blasint>(ldb), beta, c, static_cast<blasint>(ldc));
}

template <>
void gemm<double>(Trans ta, Trans tb, std::int64_t m, std::int64_t n, std::int64_t k,
                  double alpha, const double* a, std::int64_t lda, const double* b,
                  std::int64_t ldb, double beta, double* c, std::int64_t ldc) {
  if (m == 0 || n == 0) return;
  cblas_dgemm(CblasRowMajor, cblas_trans(ta), cblas_trans(tb), static_cast<blasint>(m),
              static_cast<blasint>(n), static_cast<blasint>(k), alpha, a, static_cast<blasint>(lda),
              b, static_cast<blasint>(ldb), beta, c, static_cast<blasint>(ldc));
}

void matmul(Trans ta, Trans tb, double alpha, const Tensor& a, const Tensor& b, double beta,
            Tensor& c) {
  check(a.ndim() == 2 && b.ndim() == 2 && c.ndim() == 2, "matmul: operands must be 2-D");
  check(a.dtype() == b.dtype() && a.dtype() == c.dtype(), "matmul: dtypes differ");
  std::int64_t m = ta == Trans::N ? a.rows() : a.cols();
  std::int64_t k = ta == Trans::N ? a.cols() : a.rows();
  std::int64_t kb = tb == Trans::N ? b.rows() : b.cols();
  std::int64_t n = tb == Trans::N ? b.cols() : b.rows();
  check(k == kb && c.rows() == m && c.cols() == n,
        "matmul: shapes " + shape_string(a.shape()) + (ta == Trans::T ? "^T" : "") + " x " +
            shape_string(b.shape()) + (tb == Trans::T ? "^T" : "") + " -> " +
            shape_string(c.shape()) + " do not match");
  if (a.dtype() == DType::F32) {
    gemm<float>(ta, tb, m, n, k, static_cast<float>(alpha), a.data<float>(), a.cols(),
                b.data<float>(), b.cols(), static_cast<float>(beta), c.data<float>(), c.cols());
  } else {
    gemm<double>(ta, tb, m, n, k, alpha, a.data<double>(), a.cols(), b.data<double>(), b.cols(),
                 beta, c.data<double>(), c.cols());
  }
}

Tensor matmul(const Tensor& a, const Tensor& b, Trans ta, Trans tb) {
  std::int64_t m = ta == Trans::N ? a.rows() : a.cols();
  std::int64_t n = tb == Trans::N ? b.cols() : b.rows();
  Tensor c = Tensor::zeros({m, n}, a.dtype());
  matmul(ta, tb, 1.0, a, b, 0.0, c);
  return c;
}

namespace {
template <class T>
Svd svd_impl(const Tensor& a, bool vectors) {
  const lapack_int m = static_cast<lapack_int>(a.rows());
  const lapack_int n = static_cast<lapack_int>(a.cols());
  const lapack_int k = std::min(m, n);
  Tensor work = a.clone();  // LAPACK destroys its input
  Svd out;
  out.s = Tensor::empty({k}, a.dtype());
  if (vectors) {
    out.u = Tensor::empty({m, k}, a.dtype());
    out.vt = Tensor::empty({k, n}, a.dtype());
  }
  lapack_int info;
  if constexpr (std::is_same_v<T, float>) {
    info = LAPACKE_sgesdd(LAPACK_ROW_MAJOR, vectors ? 'S' : 'N', m, n, work.data<float>(), n,
                          out.s.data<float>(), vectors ? out.u.data<float>() : nullptr, k,
                          vectors ? out.vt.data<float>() : nullptr, n);
  } else {
    info = LAPACKE_dgesdd(LAPACK_ROW_MAJOR, vectors ? 'S' : 'N', m, n, work.data<double>(), n,
                          out.s.data<double>(), vectors ? out.u.data<double>() : nullptr, k,
                          vectors ? out.vt.data<double>() : nullptr, n);
  }
  check(info == 0, "svd: LAPACK gesdd failed (info " + std::to_string(info) +
                       "); the matrix may hold NaN or Inf");
  return out;
}
}  // namespace

Svd svd(const Tensor& a) {
  check(a.ndim() == 2, "svd: matrix must be 2-D");
  return a.dtype() == DType::F32 ? svd_impl<float>(a, true) : svd_impl<double>(a, true);
}

Tensor singular_values(const Tensor& a) {
  check(a.ndim() == 2, "singular_values: matrix must be 2-D");
  return a.dtype() == DType::F32 ? svd_impl<float>(a, false).s : svd_impl<double>(a, false).s;
}

Tensor solve(const Tensor& a, const Tensor& b) {
  check(a.ndim() == 2 && a.rows() == a.cols(), "solve: A must be square");
  check(b.ndim() == 2 && b.rows() == a.rows(), "solve: B rows must match A");
  check(a.dtype() == b.dtype(), "solve: dtypes differ");
  Tensor lu = a.clone();
  Tensor x = b.clone();
  std::vector<lapack_int> pivots(static_cast<std::size_t>(a.rows()));
  const lapack_int n = static_cast<lapack_int>(a.rows());
  const lapack_int r = static_cast<lapack_int>(b.cols());
  lapack_int info = a.dtype() == DType::F32
                        ? LAPACKE_sgesv(LAPACK_ROW_MAJOR, n, r, lu.data<float>(), n,
                                        pivots.data(), x.data<float>(), r)
                        : LAPACKE_dgesv(LAPACK_ROW_MAJOR, n, r, lu.data<double>(), n,
                                        pivots.data(), x.data<double>(), r);
  check(info == 0, "solve: matrix is singular or invalid (LAPACK gesv info " +
                       std::to_string(info) + ")");
  return x;
}

double frobenius_norm(const Tensor& a) {
  double sum = 0.0;
  const std::int64_t n = a.numel();
  if (a.dtype() == DType::F32) {
    const float* p = a.data<float>();
#pragma omp parallel for reduction(+ : sum) schedule(static)
    for (std::int64_t i = 0; i < n; ++i) sum += static_cast<double>(p[i]) * p[i];
  } else {
    const double* p = a.data<double>();
#pragma omp parallel for reduction(+ : sum) schedule(static)
    for (std::int64_t i = 0; i < n; ++i) sum += p[i] * p[i];
  }
  return std::sqrt(sum);
}

double max_abs_diff(const Tensor& a, const Tensor& b) {
  check(a.numel() == b.numel(), "max_abs_diff: sizes differ");
  Tensor x = a.to(DType::F64), y = b.to(DType::F64);
  double m = 0.0;
  for (std::int64_t i = 0; i < x.numel(); ++i)
    m = std::max(m, std::abs(x.data<double>()[i] - y.data<double>()[i]));
  return m;
}

Tensor eye(std::int64_t n, DType dtype) {
  Tensor t = Tensor::zeros({n, n}, dtype);
  for (std::int64_t i = 0; i < n; ++i) {
    if (dtype == DType::F32) t.data<float>()[i * n + i] = 1.0f;
    else t.data<double>()[i * n + i] = 1.0;
  }
  return t;
}

Tensor transpose(const Tensor& a) {
  check(a.ndim() == 2, "transpose: matrix must be 2-D");
  Tensor t = Tensor::empty({a.cols(), a.rows()}, a.dtype());
  const std::int64_t r = a.rows(), c = a.cols();
  if (a.dtype() == DType::F32) {
    for (std::int64_t i = 0; i < r; ++i)
      for (std::int64_t j = 0; j < c; ++j) t.data<float>()[j * r + i] = a.data<float>()[i * c + j];
  } else {
    for (std::int64_t i = 0; i < r; ++i)
      for (std::int64_t j = 0; j < c; ++j)
        t.data<double>()[j * r + i] = a.data<double>()[i * c + j];
  }
  return t;
}

}  // namespace pion
