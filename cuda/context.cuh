#pragma once
// The CUDA side of pion::cuda::Context (the public header keeps these types opaque).
#include "check.cuh"
#include "pion/cuda/runtime.h"

namespace pion::cuda {

struct Context::Impl {
  cudaStream_t stream = nullptr;
  cublasHandle_t blas = nullptr;
  void* workspace = nullptr;  // fixed cuBLAS workspace: graph capture must not allocate
  Graph graph;                // begin_capture / end_capture / launch_graph's
};

}  // namespace pion::cuda
