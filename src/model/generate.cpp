#include "pion/model/generate.h"

#include <algorithm>
#include <string>

#include "pion/core/error.h"
#include "pion/model/decode.h"
#include "pion/model/decode_engine.h"
#include "pion/model/kv_cache.h"

namespace pion {

namespace {

using Prompts = std::span<const std::vector<std::int32_t>>;

void check_inputs(const ModelConfig& config, Prompts prompts, const GenerateOptions& options,
                  std::span<Rng> rngs) {
  options.sampling.validate();
  check(options.max_new_tokens >= 0, "generate: max_new_tokens must be >= 0 (got " +
                                         std::to_string(options.max_new_tokens) + ")");
  check(options.max_batch >= 0, "generate: max_batch must be >= 0");
  check(rngs.size() == 1 || rngs.size() == prompts.size(),
        "generate: pass one Rng, or one per prompt (got " + std::to_string(rngs.size()) +
            " for " + std::to_string(prompts.size()) + " prompts)");
  const int v = config.vocab_size;
  for (std::size_t i = 0; i < prompts.size(); ++i) {
    check(!prompts[i].empty(), "generate: prompt " + std::to_string(i) + " is empty");
    for (std::int32_t t : prompts[i])
      check(t >= 0 && t < v, "generate: prompt " + std::to_string(i) + " holds token " +
                                 std::to_string(t) + ", outside [0, " + std::to_string(v) + ")");
  }
}

// The last `limit` tokens of `ids` (the sliding context window).
std::span<const std::int32_t> window(const std::vector<std::int32_t>& ids, int limit) {
  const std::size_t n = std::min(ids.size(), static_cast<std::size_t>(limit));
  return std::span<const std::int32_t>(ids).last(n);
}

// Samples sequence i's next token from `logits`, appends it to `out` and `context`, and says
// whether the sequence is finished.
bool take_token(std::size_t i, std::span<const float> logits, const GenerateOptions& options,
                Rng& rng, SamplerScratch& scratch, Generation& out,
                std::vector<std::int32_t>& context) {
  const int token = sample_token(logits, options.sampling, rng, scratch);
  out.tokens.push_back(token);
  out.log_probs.push_back(static_cast<float>(token_log_prob(logits, token)));
  if (options.entropies) out.entropies.push_back(static_cast<float>(softmax_entropy(logits)));
  context.push_back(token);
  const auto& stops = options.stop_tokens;
  out.stopped = std::find(stops.begin(), stops.end(), token) != stops.end() ||
                (options.stop && options.stop(i, out.tokens));
  return out.stopped || static_cast<int>(out.tokens.size()) >= options.max_new_tokens;
}

}  // namespace

int generation_slots(const ModelConfig& config, std::size_t prompts,
                     const GenerateOptions& options) {
  check(options.max_batch >= 0, "generate: max_batch must be >= 0");
  int slots = options.max_batch > 0 ? options.max_batch : 64;
  slots = static_cast<int>(std::min<std::size_t>(static_cast<std::size_t>(slots), prompts));
  while (slots > 1 && KvCache::bytes_for(config, slots) > options.max_cache_bytes) slots /= 2;
  return std::max(slots, 1);
}

std::vector<Generation> generate_tokens(Llama<float>& model, Prompts prompts,
                                        const GenerateOptions& options, std::span<Rng> rngs) {
  check_inputs(model.config(), prompts, options, rngs);
  if (prompts.empty() || options.max_new_tokens == 0)
    return std::vector<Generation>(prompts.size());
  model.set_training(false);
  CpuDecodeEngine engine(model, generation_slots(model.config(), prompts.size(), options));
  return generate_tokens(engine, prompts, options, rngs);
}

std::vector<Generation> generate_tokens(DecodeEngine& engine, Prompts prompts,
                                        const GenerateOptions& options, std::span<Rng> rngs) {
  check_inputs(engine.config(), prompts, options, rngs);
  std::vector<Generation> out(prompts.size());
  if (prompts.empty() || options.max_new_tokens == 0) return out;
  const int v = engine.config().vocab_size;
  const int slots = engine.slots(), capacity = engine.capacity();
  SamplerScratch scratch;

  std::vector<std::vector<std::int32_t>> context(prompts.begin(), prompts.end());
  std::vector<long> seq_in_slot(static_cast<std::size_t>(slots), -1);
  std::size_t next_prompt = 0;
  std::vector<DecodeChunk> chunks;
  while (true) {
    chunks.clear();
    for (int s = 0; s < slots; ++s) {
      long& seq = seq_in_slot[static_cast<std::size_t>(s)];
      if (seq < 0) {  // a free slot takes the next prompt: prefill its (windowed) tokens
        if (next_prompt == prompts.size()) continue;
        seq = static_cast<long>(next_prompt++);
        engine.clear(s);
        chunks.push_back({s, window(context[static_cast<std::size_t>(seq)], capacity)});
        continue;
      }
      const auto& ctx = context[static_cast<std::size_t>(seq)];
      if (engine.length(s) < capacity) {
        chunks.push_back({s, std::span<const std::int32_t>(ctx).last(1)});
      } else {  // past the context: the window slides, so its keys must be recomputed
        engine.clear(s);
        chunks.push_back({s, window(ctx, capacity)});
      }
    }
    if (chunks.empty()) break;
    const std::span<const float> logits = engine.extend(chunks);
    for (std::size_t c = 0; c < chunks.size(); ++c) {
      const int s = chunks[c].slot;
      const auto i = static_cast<std::size_t>(seq_in_slot[static_cast<std::size_t>(s)]);
      Rng& rng = rngs.size() == 1 ? rngs[0] : rngs[i];
      if (take_token(i, logits.subspan(c * static_cast<std::size_t>(v), static_cast<std::size_t>(v)),
                     options, rng, scratch, out[i], context[i]))
        seq_in_slot[static_cast<std::size_t>(s)] = -1;
    }
  }
  return out;
}

std::vector<Generation> generate_tokens_uncached(Llama<float>& model, Prompts prompts,
                                                 const GenerateOptions& options,
                                                 std::span<Rng> rngs) {
  check_inputs(model.config(), prompts, options, rngs);
  std::vector<Generation> out(prompts.size());
  if (options.max_new_tokens == 0) return out;
  model.set_training(false);
  const int v = model.config().vocab_size, max_ctx = model.config().seq_len;
  SamplerScratch scratch;
  for (std::size_t i = 0; i < prompts.size(); ++i) {
    std::vector<std::int32_t> ids = prompts[i];
    Rng& rng = rngs.size() == 1 ? rngs[0] : rngs[i];
    while (true) {
      const auto ctx = window(ids, max_ctx);
      const int t = static_cast<int>(ctx.size());
      model.forward(ctx, {}, 1, t);
      const std::span<const float> last(model.logits() + static_cast<std::size_t>(t - 1) * v,
                                        static_cast<std::size_t>(v));
      if (take_token(i, last, options, rng, scratch, out[i], ids)) break;
    }
  }
  return out;
}

}  // namespace pion
