// The row-major GEMM wrapper over cuBLAS (cuda/gemm.cuh).
#include <atomic>
#include <limits>
#include <string>

#include "gemm.cuh"

namespace pion::cuda {
namespace {

std::atomic<long long> single_calls{0}, strided_calls{0}, pointer_array_calls{0};

int as_int(std::int64_t v, const char* what) {
  check(v >= 0 && v <= std::numeric_limits<int>::max(), std::string("cuda gemm: ") + what + " = " +
                                                            std::to_string(v) +
                                                            " does not fit cuBLAS's int arguments");
  return static_cast<int>(v);
}

// The column-major call's arguments for a row-major product: C^T (n x m) = op(B)^T (n x k)
// op(A)^T (k x m), B first.
struct ColumnMajor {
  cublasOperation_t op_b, op_a;
  int n, m, k, ldb, lda, ldc;
};

ColumnMajor column_major(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k,
                         std::int64_t lda, std::int64_t ldb, std::int64_t ldc) {
  return {trans_b ? CUBLAS_OP_T : CUBLAS_OP_N,
          trans_a ? CUBLAS_OP_T : CUBLAS_OP_N,
          as_int(n, "n"),
          as_int(m, "m"),
          as_int(k, "k"),
          as_int(ldb, "ldb"),
          as_int(lda, "lda"),
          as_int(ldc, "ldc")};
}

}  // namespace

GemmTypes gemm_types(MatmulPrecision precision, bool bf16_c) {
  const bool bf16 = precision == MatmulPrecision::Bf16;
  return {bf16 ? CUDA_R_16BF : CUDA_R_32F, bf16 && bf16_c ? CUDA_R_16BF : CUDA_R_32F,
          precision == MatmulPrecision::Tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F};
}

void gemm_rm(cublasHandle_t h, const GemmTypes& t, bool trans_a, bool trans_b, std::int64_t m,
             std::int64_t n, std::int64_t k, float alpha, const void* a, std::int64_t lda,
             const void* b, std::int64_t ldb, float beta, void* c, std::int64_t ldc) {
  const ColumnMajor cm = column_major(trans_a, trans_b, m, n, k, lda, ldb, ldc);
  single_calls.fetch_add(1, std::memory_order_relaxed);
  PION_CUBLAS_CHECK(cublasGemmEx(h, cm.op_b, cm.op_a, cm.n, cm.m, cm.k, &alpha, b, t.ab, cm.ldb, a,
                                 t.ab, cm.lda, &beta, c, t.c, cm.ldc, t.compute,
                                 CUBLAS_GEMM_DEFAULT));
}

void gemm_rm_strided(cublasHandle_t h, const GemmTypes& t, bool trans_a, bool trans_b,
                     std::int64_t m, std::int64_t n, std::int64_t k, float alpha, const void* a,
                     std::int64_t lda, long long stride_a, const void* b, std::int64_t ldb,
                     long long stride_b, float beta, void* c, std::int64_t ldc, long long stride_c,
                     std::int64_t batch) {
  const ColumnMajor cm = column_major(trans_a, trans_b, m, n, k, lda, ldb, ldc);
  strided_calls.fetch_add(1, std::memory_order_relaxed);
  PION_CUBLAS_CHECK(
      cublasGemmStridedBatchedEx(h, cm.op_b, cm.op_a, cm.n, cm.m, cm.k, &alpha, b, t.ab, cm.ldb,
                                 stride_b, a, t.ab, cm.lda, stride_a, &beta, c, t.c, cm.ldc,
                                 stride_c, as_int(batch, "batch"), t.compute, CUBLAS_GEMM_DEFAULT));
}

void gemm_rm_batched(cublasHandle_t h, const GemmTypes& t, bool trans_a, bool trans_b,
                     std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
                     const void* const* a, std::int64_t lda, const void* const* b, std::int64_t ldb,
                     float beta, void* const* c, std::int64_t ldc, std::int64_t batch) {
  const ColumnMajor cm = column_major(trans_a, trans_b, m, n, k, lda, ldb, ldc);
  pointer_array_calls.fetch_add(1, std::memory_order_relaxed);
  PION_CUBLAS_CHECK(cublasGemmBatchedEx(h, cm.op_b, cm.op_a, cm.n, cm.m, cm.k, &alpha, b, t.ab,
                                        cm.ldb, a, t.ab, cm.lda, &beta, c, t.c, cm.ldc,
                                        as_int(batch, "batch"), t.compute, CUBLAS_GEMM_DEFAULT));
}

GemmCallCounts gemm_call_counts() {
  return {single_calls.load(std::memory_order_relaxed),
          strided_calls.load(std::memory_order_relaxed),
          pointer_array_calls.load(std::memory_order_relaxed)};
}

}  // namespace pion::cuda
