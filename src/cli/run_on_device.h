#pragma once
// Runs the training loop (pion/train/trainer.h) on the back end the config's device names:
// the CPU one (pion/train/cpu_backend.h) for "cpu", the CUDA one (pion/cuda/backend.h) for
// "cuda" when this binary has the CUDA back end (a clear error otherwise).
#include "pion/model/llama.h"
#include "pion/train/trainer.h"

namespace pion::cli {

TrainSummary run_training_on_device(TrainInputs inputs, Llama<float>& model);
// Throws the same errors up front (before any data is prepared) when the device cannot run.
void require_device(const TrainConfig& config);
// require_device, and what the training back end of that device refuses before it starts
// (CUDA: mpirun).
void require_training_device(const TrainConfig& config);

// The forward-only loss of `model`'s current weights on config.device: the CPU model itself,
// or a GPU copy (config.matmul_precision, config.attention) that the returned function owns.
BatchLoss batch_loss_on_device(const TrainConfig& config, Llama<float>& model);

}  // namespace pion::cli
