#pragma once
// Generating tokens from Llama<float>: many prompts decoded together over a KV cache
// (generate_tokens), and the reference it must agree with, which re-runs the whole context
// through Llama::forward for every new token, one sequence at a time (generate_tokens_uncached).
//
// Prompts may differ in length: each sequence sits left-aligned in its own cache slot (no
// padding, no mask: attention reads only the slot's own positions). When more prompts than
// slots are given, a finished sequence's slot is refilled with the next prompt at once.
//
// The context limit: the model attends over at most seq_len tokens (its RoPE table and
// training context). Both paths use the same sliding window: a prompt longer than seq_len
// keeps its last seq_len tokens, and once prompt + generated tokens exceed seq_len, each next
// token is predicted from the last seq_len tokens at positions 0..seq_len-1. A cache cannot
// shift its positions (every deeper key depends on the tokens that left the window), so a
// sequence past seq_len is re-prefilled with its last window for each new token: exact (the
// same tokens as the uncached path) and as costly per token as the uncached path, though
// still batched. Within seq_len total, each new token costs one cached row.
//
// The scheduling, windowing, sampling and stopping are written once, over DecodeEngine
// (decode_engine.h): generate_tokens(Llama<float>&, ...) runs them on a CpuDecodeEngine,
// cuda::generate_tokens (pion/cuda/generate.h) on the GPU's cache.
#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "pion/core/random.h"
#include "pion/model/llama.h"
#include "pion/model/sampling.h"

namespace pion {

class DecodeEngine;

struct GenerateOptions {
  int max_new_tokens = 200;  // per sequence, >= 0
  SamplingParams sampling;
  // A sequence ends right after emitting any of these (the token is kept in its output).
  std::vector<std::int32_t> stop_tokens;
  // Called after each new token of sequence i with all of its new tokens so far; true ends
  // it (e.g. when their decoded text contains an end marker). Empty: never.
  std::function<bool(std::size_t i, std::span<const std::int32_t> new_tokens)> stop;
  // Sequences decoded together (cache slots). 0 = min(prompts, 64), lowered so that the cache
  // stays under max_cache_bytes. Results do not depend on it (see generate_tokens).
  int max_batch = 0;
  // Also record each new token's softmax entropy (Generation::entropies; RL's entropy metric).
  // Off by default: a second pass over the vocabulary per token.
  bool entropies = false;
  std::int64_t max_cache_bytes = std::int64_t{1} << 30;
};

struct Generation {
  std::vector<std::int32_t> tokens;  // the new tokens, stop token included
  // The model's log-probability of each chosen token: log softmax of the unmodified logits
  // (before temperature, top-k and top-p), what an RL objective differentiates.
  std::vector<float> log_probs;
  // With GenerateOptions::entropies: the entropy of softmax of the unmodified logits at each
  // new token's position (the sampling policy's entropy there); empty otherwise.
  std::vector<float> entropies;
  bool stopped = false;  // ended by a stop token or `stop`, not by max_new_tokens
};

// Continues every prompt (non-empty, ids in [0, vocab)). rngs holds one Rng shared by all
// sequences (each step draws for the running sequences in slot order, so with sampling the
// draws depend on how sequences share steps), or one per prompt (sequence i draws only from
// rngs[i]: its tokens are then the same in any batch, and the same as alone). Greedy decoding
// (temperature 0) draws nothing. Sets the model to eval mode (no dropout).
std::vector<Generation> generate_tokens(Llama<float>& model,
                                        std::span<const std::vector<std::int32_t>> prompts,
                                        const GenerateOptions& options, std::span<Rng> rngs);

// The same over any engine, with all of its slots (options.max_batch and max_cache_bytes
// were the engine's builder's to apply: generation_slots). Its capacity is the context window
// and must be the model's seq_len for the results above to hold. The engine's model should be
// in eval mode (no dropout); slots are cleared as prompts are assigned to them.
std::vector<Generation> generate_tokens(DecodeEngine& engine,
                                        std::span<const std::vector<std::int32_t>> prompts,
                                        const GenerateOptions& options, std::span<Rng> rngs);

// The slots generate_tokens decodes `prompts` prompts with: options.max_batch (0: 64), at most
// one per prompt, halved while the cache (KvCache::bytes_for) would exceed max_cache_bytes;
// at least 1. Validates the options it reads (pion::Error).
int generation_slots(const ModelConfig& config, std::size_t prompts,
                     const GenerateOptions& options);

// Generation with a model (and device) bound in: what `pion sample` and the exact-match
// evaluation take, so they run on whichever device built it (cli/run_on_device.h).
using TokenGenerator =
    std::function<std::vector<Generation>(std::span<const std::vector<std::int32_t>> prompts,
                                          const GenerateOptions& options, std::span<Rng> rngs)>;

// The reference: one sequence at a time, Llama::forward over the whole (windowed) context for
// every token, the same sampler; same arguments and results. For tests and `pion bench generate`.
std::vector<Generation> generate_tokens_uncached(Llama<float>& model,
                                                 std::span<const std::vector<std::int32_t>> prompts,
                                                 const GenerateOptions& options,
                                                 std::span<Rng> rngs);

}  // namespace pion
