#pragma once
// Inference-only incremental forward of Llama<float> over a KvCache: no activations kept for
// backward, no dropout. Each call appends new tokens to some cache slots and returns the
// logits after them; prefill (a whole prompt) and a decode step (one token per sequence) are
// the same call with chunks of different lengths, so one call can mix them.
//
//   Decoder dec(model);  KvCache cache(model.config(), slots);
//   dec.extend(cache, {{0, prompt0}, {1, prompt1}});           // prefill two sequences
//   dec.extend(cache, {{0, next0}, {1, next1}});               // one token each
//
// Every token row goes through the same GEMMs (rows of all chunks stacked), RoPE at its own
// position (the slot's length before the call + its index in the chunk), and attends to
// positions 0..its own of its own slot only. Numerically this is the full forward
// (Llama::forward) up to float rounding of differently shaped GEMMs.
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "pion/model/kv_cache.h"
#include "pion/model/layers.h"
#include "pion/model/llama.h"

namespace pion {

// Tokens appended to cache slot `slot` at positions length[slot], length[slot] + 1, ...
struct DecodeChunk {
  int slot = 0;
  std::span<const std::int32_t> tokens;
};

// One extend call's chunks laid out as rows (every token one row, chunks in order).
struct DecodePlan {
  std::vector<std::int32_t> tokens;    // [rows]
  std::vector<std::int32_t> row_slot;  // [rows] the row's cache slot
  std::vector<std::int32_t> row_pos;   // [rows] its position there (RoPE and the cache row)
  std::vector<std::int32_t> out_rows;  // the rows that get logits, ascending
};
// Checks the chunks against the slots' lengths (non-empty chunks, distinct slots in
// [0, lengths.size()), ids in [0, vocab), each fitting the slot's remaining capacity) and
// fills `plan` (reusing its storage). `who` starts every error message.
void plan_decode(DecodePlan& plan, std::span<const DecodeChunk> chunks,
                 std::span<const int> lengths, int capacity, int vocab, bool all_positions,
                 const std::string& who);

class Decoder {
 public:
  // Reads the model's weights at every call (so training between calls is seen); the model
  // must outlive the decoder.
  explicit Decoder(Llama<float>& model);

  // Runs the chunks (non-empty, distinct slots, ids in [0, vocab), each fitting in the
  // slot's remaining capacity: checked, pion::Error otherwise), stores their keys and values
  // and advances the slots' lengths. Returns logits [rows, vocab]: one row per chunk (after
  // its last token), or with all_positions one per token, chunk after chunk. The span is
  // valid until the next call.
  std::span<const float> extend(KvCache& cache, std::span<const DecodeChunk> chunks,
                                bool all_positions = false);

 private:
  struct LayerOffsets {
    std::int64_t attn_norm, wqkv, wo, mlp_norm, w_gate_up, w_down;
  };
  void ensure_scratch(std::int64_t rows, std::int64_t out_rows);
  // -1 for a model without norms (ModelConfig::norm "none").
  std::int64_t norm_offset(const std::vector<ParamEntry>& layout, const std::string& name) const;
  // RMSNorm of `rows` rows with the weight at `weight_offset`; a copy when it is -1.
  void norm_rows(float* out, float* rstd, const float* in, std::int64_t weight_offset,
                 std::int64_t rows, double eps) const;
  void attend(float* att, const float* qkv, const KvCache& cache, int layer) const;

  Llama<float>& model_;
  ModelConfig config_;
  layers::RopeTable<float> rope_;
  std::int64_t tok_embedding_ = 0, final_norm_ = 0, lm_head_ = 0;
  std::vector<LayerOffsets> layers_;

  // Per-row bookkeeping and activations, grown as needed.
  DecodePlan plan_;
  std::vector<float> x_, h_, qkv_, att_, proj_, gu_, act_, rstd_, h_out_, logits_;
};

// log p(targets[i] | inputs up to i) for every position of a padded batch [rows, seq] with
// targets[i] >= 0 (0 elsewhere, as Llama::target_log_probs lays them out), by the decoder: each
// row runs only up to its last target (no padding, no activations kept), 64 rows at a time.
// The same values as Llama::forward + target_log_probs up to float rounding, for less work
// (RL's reference policy). Sets the model to eval mode.
void score_targets(Llama<float>& model, std::span<const std::int32_t> inputs,
                   std::span<const std::int32_t> targets, int rows, int seq,
                   std::span<double> log_probs);

}  // namespace pion
