#pragma once
// A CUDA optimizer configured like one param group of a CPU optimizer (pion/optim/): the
// same kind and hyperparameters (read from Optimizer::group_options, so the CPU's validation
// and defaults apply), over parameters already in device memory. Used by the GPU trainer
// (one CUDA optimizer per param group of the routed OptimizerSet) and by
// `pion optim-trace --device cuda`. Host C++ in pion_gpu (cuda/optim/optim_like.cpp).
#include <memory>
#include <string>
#include <vector>

#include "pion/cuda/optim.h"
#include "pion/optim/optimizer.h"

namespace pion::cuda {

struct CudaPrecisions {
  std::string pion = "fp32";  // fp32 | mixed (CudaPionOptions::precision)
  std::string muon = "bf16";  // bf16 | fp32 (CudaMuonOptions::precision)
};

// Throws pion::Error for what the GPU does not run yet (Pion's cayley / exp retractions and
// re-anchoring), naming the option to change.
std::unique_ptr<CudaOptimizer> make_cuda_optimizer_like(Context& ctx, const Optimizer& cpu,
                                                        std::size_t group,
                                                        std::vector<DeviceParam> params,
                                                        const CudaPrecisions& precision);

}  // namespace pion::cuda
