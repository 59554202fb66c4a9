#pragma once
// The CPU back end of the training loop (pion/train/backend.h): the Llama<float> model and
// an OptimizerSet built from the config (build_optimizer.h).
//
// Under `mpirun -np N` (pion/dist): each rank runs forward and backward on batch_size / N
// rows; the micro-batch's loss is weighted by this rank's share of the counted targets, so
// the summed gradients are the global mean's; gradients are summed in per-layer buckets
// started during the last micro-batch's backward; each rank steps only the parameters it
// owns (dist/shard.h) and broadcasts them after the step. Checkpoints gather the sharded
// optimizer state, so they are identical whatever N.
#include <memory>

#include "pion/model/llama.h"
#include "pion/train/backend.h"
#include "pion/train/config.h"

namespace pion {

// The CPU model's BatchLoss (forward only; the model must outlive it).
BatchLoss cpu_batch_loss(Llama<float>& model);

// Sets OpenMP's and OpenBLAS's thread counts (config.threads > 0), checks that a local batch
// fits in memory, and builds this rank's optimizers. `model` must outlive the back end.
std::unique_ptr<TrainBackend> make_cpu_backend(const TrainConfig& config, Llama<float>& model);

}  // namespace pion
