#pragma once
// Dense linear algebra on row-major CPU tensors: GEMM through OpenBLAS (cblas), SVD and
// linear solves through LAPACKE. Templated on float and double so fp64 reference checks
// (finite differences, spec references) run through the same code as the fp32 path.
#include <cstdint>

#include "pion/core/tensor.h"

namespace pion {

enum class Trans { N, T };

// C(m x n) = alpha * op(A) * op(B) + beta * C on raw row-major buffers with leading dims.
template <class T>
void gemm(Trans ta, Trans tb, std::int64_t m, std::int64_t n, std::int64_t k, T alpha,
          const T* a, std::int64_t lda, const T* b, std::int64_t ldb, T beta, T* c,
          std::int64_t ldc);

// Tensor form for 2-D tensors; shapes are checked. C must already have the result shape.
void matmul(Trans ta, Trans tb, double alpha, const Tensor& a, const Tensor& b, double beta,
            Tensor& c);
// Returns op(A) * op(B) in a new tensor.
Tensor matmul(const Tensor& a, const Tensor& b, Trans ta = Trans::N, Trans tb = Trans::N);

// Thin SVD A = U diag(S) Vt of an m x n matrix, k = min(m, n): U m x k, S k, Vt k x n.
struct Svd {
  Tensor u, s, vt;
};
Svd svd(const Tensor& a);
// Singular values only (descending), same dtype as A.
Tensor singular_values(const Tensor& a);
// Solves A X = B for square A (n x n) and B (n x r); returns X. Throws on a singular A.
Tensor solve(const Tensor& a, const Tensor& b);

// Frobenius norm, accumulated in double.
double frobenius_norm(const Tensor& a);
// Largest |a_i - b_i|.
double max_abs_diff(const Tensor& a, const Tensor& b);
// Identity matrix n x n.
Tensor eye(std::int64_t n, DType dtype = DType::F32);
// Transposed copy of a 2-D tensor.
Tensor transpose(const Tensor& a);

}  // namespace pion
