#pragma once
// The pretraining data loader over one token shard.
//
// Training batches (next_batch) are nanoGPT's get_batch: B_global window starts drawn
// uniformly from [0, n - T) with a seeded pion::Rng; row b is tokens[s_b, s_b + T) and its
// targets tokens[s_b + 1, s_b + T + 1). With world_size > 1 every rank draws the SAME B_global
// starts from the same stream and keeps rows [rank * B_global / world, (rank + 1) * B_global /
// world), so a 2-rank run sees exactly the windows of a 1-rank run with the same global batch.
//
// Evaluation batches (eval_batch) are fixed: global row j of eval batch k is the
// non-overlapping window number (k * B_global + j) mod W, W = (n - 1) / T, so the validation
// loss of two runs (or two checkpoints) is measured on the same tokens. Windows repeat once
// eval batches * B_global exceeds W.
//
// state() / set_state() save and restore the random stream as a small JSON string, so a
// resumed run draws exactly the batches an uninterrupted one would.
#include <array>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "pion/core/random.h"

namespace pion {

// A B x T batch of token ids, row-major. targets[i] < 0 means "no loss here" (finetuning).
// A loader's saved position (its state() string, parsed and range-checked): the random
// stream, the batches drawn so far and the size of the data it was saved over (`count_key`:
// "tokens" for a shard, "examples" for a finetuning set). `what` names the loader in errors.
struct LoaderPosition {
  std::array<std::uint64_t, 4> rng{};
  std::int64_t batches = 0;
  std::int64_t count = 0;
};
LoaderPosition parse_loader_position(const std::string& state, const char* count_key,
                                     const std::string& what);

struct Batch {
  std::int64_t rows = 0;     // B (this rank's rows)
  std::int64_t seq_len = 0;  // T
  std::vector<std::int32_t> inputs;
  std::vector<std::int32_t> targets;
};

struct LoaderOptions {
  std::int64_t batch_size = 1;  // the GLOBAL batch (all ranks together)
  std::int64_t seq_len = 1;     // T
  int rank = 0;
  int world_size = 1;
  std::uint64_t seed = 1337;
};

class DataLoader {
 public:
  // Errors: empty or too short token stream (needs at least T + 1 tokens), batch size not
  // divisible by world_size, rank out of range.
  DataLoader(std::vector<std::uint16_t> tokens, const LoaderOptions& options);
  // Reads the shard at `path` (read_shard's validation applies).
  static DataLoader from_shard(const std::string& path, const LoaderOptions& options);

  Batch next_batch();                          // random windows (training)
  Batch eval_batch(std::int64_t index) const;  // fixed windows (evaluation)
  // Eval batches needed to visit every fixed window once: ceil(W / B_global).
  std::int64_t eval_batches_per_pass() const;

  std::string state() const;                 // JSON: {"rng": [4 words], "batches": n, "tokens": n}
  void set_state(const std::string& state);  // errors on malformed state or another shard

  std::int64_t num_tokens() const { return static_cast<std::int64_t>(tokens_.size()); }
  std::int64_t local_batch_size() const { return options_.batch_size / options_.world_size; }
  std::int64_t batches_drawn() const { return batches_drawn_; }
  std::span<const std::uint16_t> tokens() const { return tokens_; }
  const LoaderOptions& options() const { return options_; }

 private:
  Batch windows(std::span<const std::int64_t> global_starts) const;

  std::vector<std::uint16_t> tokens_;
  LoaderOptions options_;
  Rng rng_;
  std::int64_t batches_drawn_ = 0;
};

// Checks rank / world_size / batch size (shared with the finetuning loader).
void validate_rank_slicing(std::int64_t global_batch, int rank, int world_size);

}  // namespace pion
