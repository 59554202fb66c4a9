#pragma once
// The row-major GEMM of the CUDA back end, the one place that turns a row-major product into
// a cuBLAS call; the layers, the optimizers and the GEMM benchmark all go through it.
//
// Row-major C (m x n) = alpha op(A) op(B) + beta C, with lda, ldb, ldc the row strides of A,
// B and C as stored (op(A) is m x k, op(B) is k x n). cuBLAS is column-major, and a row-major
// buffer read column-major is the transpose of the matrix, so each call asks cuBLAS for
// C^T = op(B)^T op(A)^T: the operands and m, n swap places, each keeps its own transpose flag
// (op(X)^T is X read column-major when op is N, and its transpose when op is T), and the row
// strides become the leading dimensions. beta = 1 accumulates into C in fp32 whatever the
// types. Every size must fit cuBLAS's int arguments (pion::Error otherwise).
#include <cstddef>
#include <cstdint>

#include "check.cuh"
#include "pion/cuda/precision.h"
#include "pion/cuda/runtime.h"  // GemmCallCounts

namespace pion::cuda {

// The cuBLAS data types of A and B, of C, and the compute type of a GEMM.
struct GemmTypes {
  cudaDataType ab;
  cudaDataType c;
  cublasComputeType_t compute;
};

// A and B are bf16 for Bf16 and fp32 otherwise; C is fp32 unless bf16_c and Bf16. The compute
// type is CUBLAS_COMPUTE_32F_FAST_TF32 for Tf32 (fp32 inputs rounded to TF32 for the tensor
// cores) and CUBLAS_COMPUTE_32F otherwise: plain fp32 under the Context's CUBLAS_DEFAULT_MATH,
// and bf16 inputs use the tensor cores either way.
GemmTypes gemm_types(MatmulPrecision precision, bool bf16_c = false);

// One product (cublasGemmEx).
void gemm_rm(cublasHandle_t h, const GemmTypes& t, bool trans_a, bool trans_b, std::int64_t m,
             std::int64_t n, std::int64_t k, float alpha, const void* a, std::int64_t lda,
             const void* b, std::int64_t ldb, float beta, void* c, std::int64_t ldc);

// `batch` products whose matrices sit stride_* elements apart (cublasGemmStridedBatchedEx).
void gemm_rm_strided(cublasHandle_t h, const GemmTypes& t, bool trans_a, bool trans_b,
                     std::int64_t m, std::int64_t n, std::int64_t k, float alpha, const void* a,
                     std::int64_t lda, long long stride_a, const void* b, std::int64_t ldb,
                     long long stride_b, float beta, void* c, std::int64_t ldc, long long stride_c,
                     std::int64_t batch);

// `batch` products through device arrays of matrix pointers (cublasGemmBatchedEx).
void gemm_rm_batched(cublasHandle_t h, const GemmTypes& t, bool trans_a, bool trans_b,
                     std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
                     const void* const* a, std::int64_t lda, const void* const* b, std::int64_t ldb,
                     float beta, void* const* c, std::int64_t ldc, std::int64_t batch);

// Bytes per element of a GEMM data type (CUDA_R_32F or CUDA_R_16BF).
inline std::size_t bytes_per_element(cudaDataType t) {
  return t == CUDA_R_16BF ? 2 : 4;
}

}  // namespace pion::cuda
