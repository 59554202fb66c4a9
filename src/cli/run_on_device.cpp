#include "cli/run_on_device.h"

#include "pion/core/error.h"
#include "pion/train/build_optimizer.h"
#include "pion/train/cpu_backend.h"
#ifdef PION_HAVE_CUDA
#include "pion/cuda/backend.h"
#include "pion/cuda/generate.h"
#include "pion/cuda/llama.h"
#include "pion/cuda/runtime.h"
#endif

namespace pion::cli {

#ifdef PION_HAVE_CUDA
namespace {
// A GPU copy of `model`'s weights (under `config`, `options`) with its own context, kept alive
// by the function that holds it (the validation loss, the generator).
struct GpuCopy {
  cuda::Context ctx;
  std::unique_ptr<cuda::CudaLlama> model;
};
std::shared_ptr<GpuCopy> gpu_copy(const ModelConfig& config, const cuda::CudaLlamaOptions& options,
                                  Llama<float>& model) {
  auto gpu = std::make_shared<GpuCopy>();
  gpu->model = std::make_unique<cuda::CudaLlama>(gpu->ctx, config, options);
  gpu->model->upload_params(
      {model.params().data<float>(), static_cast<std::size_t>(model.params().numel())});
  return gpu;
}
}  // namespace
#endif

void require_device(const std::string& device) {
  check(device == "cpu" || device == "cuda", "--device must be cpu or cuda, got '" + device + "'");
  TrainConfig config;
  config.device = device;
  require_device(config);
}

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

void require_training_device(const TrainConfig& config) {
  require_device(config);
#ifdef PION_HAVE_CUDA
  if (config.device == "cuda") cuda::require_one_process();
#endif
}

BatchLoss batch_loss_on_device(const TrainConfig& config, Llama<float>& model) {
  require_device(config);
  if (config.device == "cpu") return cpu_batch_loss(model);
#ifdef PION_HAVE_CUDA
  cuda::CudaLlamaOptions options;
  options.matmul = cuda::parse_matmul_precision(config.matmul_precision);
  options.attention =
      cuda::choose_attention(config.attention, model.config(), config.batch_size, options.matmul);
  auto gpu = gpu_copy(model.config(), options, model);
  return [gpu](std::span<const std::int32_t> inputs, std::span<const std::int32_t> targets,
               int rows, int seq, std::int64_t& counted) {
    gpu->model->forward_backward(inputs, targets, rows, seq, 0.0);
    const auto loss = gpu->model->read_loss();
    counted = loss.count;
    return loss.loss;
  };
#else
  return {};  // not reached: require_device threw
#endif
}

TrainSummary run_training_on_device(TrainInputs inputs, Llama<float>& model) {
  require_device(inputs.config);
  if (inputs.config.device == "cpu") return run_training(std::move(inputs), model);
#ifdef PION_HAVE_CUDA
  inputs.config.validate();
  std::unique_ptr<TrainBackend> backend = cuda::make_cuda_backend(inputs.config, model);
  return run_training(std::move(inputs), *backend);
#else
  return {};  // not reached: require_device threw
#endif
}

TokenGenerator generator_on_device(const std::string& device, const std::string& matmul_precision,
                                   Llama<float>& model) {
  require_device(device);
  if (device == "cpu")
    return
        [&model](std::span<const std::vector<std::int32_t>> prompts, const GenerateOptions& options,
                 std::span<Rng> rngs) { return generate_tokens(model, prompts, options, rngs); };
#ifdef PION_HAVE_CUDA
  cuda::CudaLlamaOptions options;
  options.matmul = cuda::parse_matmul_precision(matmul_precision);
  // Generation never uses dropout (eval mode): a model trained with it decodes on the GPU too.
  ModelConfig config = model.config();
  config.dropout = 0.0;
  auto gpu = gpu_copy(config, options, model);
  return [gpu](std::span<const std::vector<std::int32_t>> prompts, const GenerateOptions& opts,
               std::span<Rng> rngs) {
    return cuda::generate_tokens(*gpu->model, prompts, opts, rngs);
  };
#else
  (void)matmul_precision;
  return {};  // not reached: require_device threw
#endif
}

}  // namespace pion::cli
