#pragma once
// Runs the training loop (pion/train/trainer.h) on the back end the config's device names:
// the CPU one (pion/train/cpu_backend.h) for "cpu", the CUDA one (pion/cuda/backend.h) for
// "cuda" when this binary has the CUDA back end (a clear error otherwise).
#include <string>

#include "pion/model/generate.h"
#include "pion/model/llama.h"
#include "pion/train/trainer.h"

namespace pion::cli {

TrainSummary run_training_on_device(TrainInputs inputs, Llama<float>& model);
// Throws the same errors up front (before any data is prepared) when the device cannot run.
void require_device(const TrainConfig& config);
// The same for a --device flag outside a TrainConfig (`pion sample`, `pion eval`): also
// refuses anything but cpu and cuda.
void require_device(const std::string& device);
// require_device, and what the training back end of that device refuses before it starts
// (CUDA: mpirun).
void require_training_device(const TrainConfig& config);

// The forward-only loss of `model`'s current weights on config.device: the CPU model itself,
// or a GPU copy (config.matmul_precision, config.attention) that the returned function owns.
BatchLoss batch_loss_on_device(const TrainConfig& config, Llama<float>& model);

// Token generation (pion/model/generate.h) with `model`'s current weights on `device`: the
// CPU model itself (generate_tokens), or a GPU copy of its weights, uploaded once here, with
// GEMMs in `matmul_precision` (bf16 | tf32 | fp32) that the returned function owns and
// decodes with (cuda::generate_tokens). Later changes to `model` are not seen by the GPU copy.
TokenGenerator generator_on_device(const std::string& device, const std::string& matmul_precision,
                                   Llama<float>& model);

}  // namespace pion::cli
