#pragma once
// How a GEMM of the CUDA back end runs: the one precision enum of the layers, the model, the
// optimizers and the benchmarks (cuda/gemm.cuh maps it onto cuBLAS types). Every precision
// accumulates in fp32:
//   Fp32: fp32 data, plain fp32 on the CUDA cores (no TF32);
//   Tf32: fp32 data rounded to TF32 on the tensor cores, fp32 out;
//   Bf16: bf16 inputs on the tensor cores; the caller supplies the bf16 copies and says
//         whether C is fp32 (the layers) or bf16 (Muon's Newton-Schulz, the GEMM benchmark).
// Plain C++17 without CUDA types (see runtime.h).

namespace pion::cuda {

enum class MatmulPrecision { Fp32, Tf32, Bf16 };

}  // namespace pion::cuda
