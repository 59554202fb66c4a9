#pragma once
// Choosing the next token from a row of logits: greedy, or a draw from the softmax at a
// temperature restricted to the top-k tokens and then to the top-p nucleus.
#include <cstdint>
#include <span>
#include <vector>

#include "pion/core/random.h"

namespace pion {

struct SamplingParams {
  double temperature = 1.0;  // 0 = greedy (argmax, the lowest id among ties; no draw)
  int top_k = 0;             // keep the k largest logits (0 or >= vocab = all)
  double top_p = 1.0;        // then the smallest prefix of those, by probability, whose mass
                             // reaches top_p (1 = all); always at least one token
  // Throws pion::Error for a negative or non-finite temperature, top_k < 0, top_p outside (0, 1].
  void validate() const;
};

// Reusable scratch, so sampling a token allocates nothing after the first call.
struct SamplerScratch {
  std::vector<int> order;
  std::vector<float> probs;
};

// Draws one token. One rng.uniform() per sampled token (none when greedy): a fixed rng state
// gives the same token. Candidates are sorted by logit (std::partial_sort, largest first),
// weighted exp((logit - max) / temperature) in float, and the draw walks their cumulative sum.
int sample_token(std::span<const float> logits, const SamplingParams& params, Rng& rng,
                 SamplerScratch& scratch);

// log softmax(logits)[token] of the unmodified logits (no temperature or filter), in double.
double token_log_prob(std::span<const float> logits, int token);

// The entropy (nats) of softmax(logits) of the unmodified logits, in double: an RL policy's
// entropy at a sampled position (what Llama::target_log_probs reports for the same logits).
double softmax_entropy(std::span<const float> logits);

}  // namespace pion
