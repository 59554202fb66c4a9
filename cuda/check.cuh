#pragma once
// Error checks for the CUDA back end: every runtime and cuBLAS call goes through these and a
// failure throws pion::Error naming the call and CUDA's own message.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <string>

#include "pion/core/error.h"

namespace pion::cuda {

inline void check_cuda(cudaError_t e, const char* call, const char* file, int line) {
  if (e != cudaSuccess)
    throw Error(std::string("cuda: ") + call + " failed at " + file + ":" + std::to_string(line) +
                ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")");
}

inline void check_cublas(cublasStatus_t s, const char* call, const char* file, int line) {
  if (s != CUBLAS_STATUS_SUCCESS)
    throw Error(std::string("cublas: ") + call + " failed at " + file + ":" + std::to_string(line) +
                ": " + cublasGetStatusName(s) + " (" + cublasGetStatusString(s) + ")");
}

}  // namespace pion::cuda

#define PION_CUDA_CHECK(call) ::pion::cuda::check_cuda((call), #call, __FILE__, __LINE__)
#define PION_CUBLAS_CHECK(call) ::pion::cuda::check_cublas((call), #call, __FILE__, __LINE__)
// After a kernel launch: reports a bad launch configuration without synchronising.
#define PION_CUDA_CHECK_LAUNCH(what) \
  ::pion::cuda::check_cuda(cudaGetLastError(), what, __FILE__, __LINE__)
