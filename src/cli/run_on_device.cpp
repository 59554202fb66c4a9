#include "cli/run_on_device.h"

#include "pion/core/error.h"
#ifdef PION_HAVE_CUDA
#include "pion/cuda/runtime.h"
#include "pion/cuda/trainer.h"
#endif

namespace pion::cli {

void require_device(const TrainConfig& config) {
  if (config.device == "cpu") return;
#ifdef PION_HAVE_CUDA
  check(cuda::device_count() > 0,
        "--device cuda: no CUDA device is visible (cudaGetDeviceCount reports none); run on a "
        "machine with an NVIDIA GPU, or use --device cpu");
#else
  throw Error(
      "--device cuda: this pion was built without the CUDA back end (PION_CUDA=OFF, or CMake "
      "found no nvcc); rebuild with -DPION_CUDA=ON on a machine with the CUDA toolkit, or use "
      "--device cpu");
#endif
}

TrainSummary run_training_on_device(TrainInputs inputs, Llama<float>& model) {
  require_device(inputs.config);
  if (inputs.config.device == "cpu") return run_training(std::move(inputs), model);
#ifdef PION_HAVE_CUDA
  return cuda::run_training_cuda(std::move(inputs), model);
#else
  return {};  // not reached: require_device threw
#endif
}

}  // namespace pion::cli
