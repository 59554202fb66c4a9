#pragma once
// What a batch costs before it is run: an estimate of the bytes the CPU model needs for its
// weights, gradients, optimizer state and the activations of one [batch, seq] forward/backward
// (src/model/llama.cpp: per layer the residuals, norms, q/k/v, the B x H x T x T attention
// probabilities, the MLP's gate/up/act; then the B x T x V logits; plus one layer's gradient
// scratch), and a guard that refuses a batch whose estimate exceeds what this process may use.
//
// batch_size and seq_len come from flags, config files and checkpoint metadata, so a typo or a
// tampered file could otherwise ask for terabytes: the guard turns that into one clear error
// before anything sized by them is allocated, instead of a bad_alloc or the OOM killer.
#include <cstdint>
#include <initializer_list>
#include <string>

#include "pion/model/config.h"

namespace pion {

struct MemoryEstimate {
  std::uint64_t weights = 0;      // the parameter buffer
  std::uint64_t grads = 0;        // the gradient buffer (training only)
  std::uint64_t optimizer = 0;    // optimizer state (two moments per parameter unless given)
  std::uint64_t activations = 0;  // forward activations + backward scratch of one batch
  // The sum, saturating at UINT64_MAX (an estimate for an absurd shape is "too much", never a
  // small wrapped-around number).
  std::uint64_t total() const {
    std::uint64_t sum = 0;
    for (std::uint64_t part : {weights, grads, optimizer, activations})
      sum = part > UINT64_MAX - sum ? UINT64_MAX : sum + part;
    return sum;
  }
};

// The estimate for `rows` sequences of `seq` tokens with `element_bytes`-byte elements (4 for
// Llama<float>). `training` adds gradients, optimizer state and the backward scratch. Saturates
// instead of overflowing. `optimizer_bytes` is the optimizer state when the caller knows it
// (OptimizerSet::planned_state_bytes: Pion's default keeps 2 (m^2 + n^2) floats for an [m, n]
// matrix, about 3x AdamW's on an MLP matrix); < 0 assumes AdamW's two moments per parameter.
MemoryEstimate estimate_memory(const ModelConfig& config, std::int64_t rows, std::int64_t seq,
                               bool training, int element_bytes = 4,
                               std::int64_t optimizer_bytes = -1);

struct MemoryLimit {
  std::uint64_t bytes = 0;  // UINT64_MAX when nothing limits it
  std::string source;       // "RLIMIT_AS (ulimit -v)" or "physical memory"
};
// The smaller of the address-space limit (getrlimit(RLIMIT_AS)) and physical memory
// (sysconf(_SC_PHYS_PAGES) x page size).
MemoryLimit process_memory_limit();

// Throws pion::Error when estimate_memory(...).total() exceeds `limit`, e.g.
//   "pion train: batch_size 1000000 x seq_len 256 needs about 812.3 GiB for activations (4.1
//    GiB with weights, gradients and optimizer state: ...); this process may use 3.8 GiB
//    (RLIMIT_AS (ulimit -v)); lower batch_size or seq_len"
// `what` names the command. `rows` is the batch this process runs (batch_size / ranks).
void check_batch_memory(const ModelConfig& config, std::int64_t rows, std::int64_t seq,
                        bool training, const std::string& what, const MemoryLimit& limit);
// The same against process_memory_limit().
void check_batch_memory(const ModelConfig& config, std::int64_t rows, std::int64_t seq,
                        bool training, const std::string& what);
// A training batch with the optimizer state the caller computed (the trainer's back end, once
// its optimizers exist), against `limit` or process_memory_limit().
void check_training_memory(const ModelConfig& config, std::int64_t rows, std::int64_t seq,
                           std::uint64_t optimizer_bytes, const std::string& what,
                           const MemoryLimit& limit);
void check_training_memory(const ModelConfig& config, std::int64_t rows, std::int64_t seq,
                           std::uint64_t optimizer_bytes, const std::string& what);

}  // namespace pion
