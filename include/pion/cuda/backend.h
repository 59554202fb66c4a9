#pragma once
// The CUDA back end of the training loop (pion/train/backend.h): `pion train --device cuda`
// is pion::run_training (pion/train/trainer.h), the same loop as on the CPU, over this back
// end. The model is a CudaLlama, the optimizers are the CUDA ones (pion/cuda/optim.h)
// routed exactly as build_optimizers routes the CPU ones (one CUDA optimizer per param
// group), and checkpoints have the CPU trainer's format and names, so a run can move
// between devices with --resume (--device cpu|cuda).
//
// `host_model` is the CPU mirror: it holds the initial weights on entry (initialised by the
// caller as for a CPU run, so both devices start from the same bits), receives the weights
// whenever a checkpoint is written, and the final ones on return.
//
// What differs from the CPU run:
// - the model's GEMMs run in config.matmul_precision (bf16 by default) and attention is
//   materialised or fused (flash) as choose_attention (llama.h) picks for config.attention;
//   --matmul_precision fp32 --attention materialized is the
//   CPU's arithmetic up to summation order.
// - Pion runs the taylor2 retraction only (config.pion_precision fp32 | mixed), without
//   re-anchoring; Muon's Newton-Schulz runs in config.muon_precision (bf16 by default).
// - dropout > 0 and data parallelism (mpirun) are rejected with an error.
// - RL objectives (MicroBatch::objective) run as on the CPU: a forward-only pass, the
//   per-target log-probs and entropies downloaded in double, the objective on the host, and
//   the weighted cross-entropy's backward; policy_sampler() is cuda::generate_tokens over the
//   device weights (pion/cuda/generate.h, KV-cached, sampling on the host); frozen_scorer()
//   (RL's reference policy) is a forward-only CudaLlama with the training model's options.
// - spectrum drift at evals needs an fp64 SVD of every Pion matrix on the host; it is computed
//   at evals only while the Pion matrices hold under 20M parameters, and always at the end.
// - the optimizer step of every group is captured into one CUDA graph after the first
//   (eager) step and replayed, and so is each micro-batch's forward/backward (CudaLlama, one
//   graph per shape and loss scale: training and evaluation); if a capture fails the trainer
//   says so and runs that part eagerly. A step is then a handful of host calls: the gradient
//   zeroing, per micro-batch the token copies and a graph launch and the loss read, the
//   norm's kernel and read, the optimizer's graph. The clip and the NaN/Inf skip stay host
//   decisions on the one norm read per step (the loop's rule, shared with the CPU back end).
//   cuda_graphs false launches every kernel (for profilers and debuggers).
#include <memory>

#include "pion/model/llama.h"
#include "pion/train/backend.h"
#include "pion/train/config.h"

namespace pion::cuda {

// Refuses mpirun (the error of make_cuda_backend, for commands that check before preparing
// anything).
void require_one_process();

// Refuses mpirun and a machine without a visible CUDA device (errors say what to do).
// `config` and `host_model` must outlive the back end.
std::unique_ptr<TrainBackend> make_cuda_backend(const TrainConfig& config,
                                                Llama<float>& host_model);

}  // namespace pion::cuda
