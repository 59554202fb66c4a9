#include "cli/exact_match_eval.h"

#include <algorithm>
#include <string>
#include <vector>

#include "pion/core/error.h"
#include "pion/model/generate.h"

namespace pion::cli {

double exact_match_accuracy(Llama<float>& model, const Tokenizer& tokenizer,
                            std::span<const FinetuneExample> examples, std::ostream& log) {
  const TokenGenerator on_cpu = [&model](std::span<const std::vector<std::int32_t>> prompts,
                                         const GenerateOptions& options, std::span<Rng> rngs) {
    return generate_tokens(model, prompts, options, rngs);
  };
  return exact_match_accuracy(on_cpu, tokenizer, examples, log);
}

double exact_match_accuracy(const TokenGenerator& generator, const Tokenizer& tokenizer,
                            std::span<const FinetuneExample> examples, std::ostream& log) {
  if (examples.empty()) return 0.0;
  // All prompts are decoded greedily in one batched, KV-cached call; each stops at the end
  // marker or after its own limit (the reference answer's length + 8 tokens).
  std::vector<std::vector<std::int32_t>> prompts;
  std::vector<std::size_t> limits;
  for (const auto& ex : examples) {
    prompts.push_back(tokenizer.encode(ex.prompt));
    check(!prompts.back().empty(), "sample: the prompt must not be empty");
    limits.push_back(tokenizer.encode(ex.response).size() + 8);
  }
  const std::string marker(kDefaultEndMarker);
  GenerateOptions opts;
  opts.sampling.temperature = 0.0;
  opts.max_new_tokens = static_cast<int>(*std::max_element(limits.begin(), limits.end()));
  opts.stop = [&](std::size_t i, std::span<const std::int32_t> new_tokens) {
    return new_tokens.size() >= limits[i] ||
           tokenizer.decode(new_tokens).find(marker) != std::string::npos;
  };
  Rng unused(0);  // greedy decoding draws nothing
  const auto results = generator(prompts, opts, std::span<Rng>(&unused, 1));

  std::size_t hits = 0;
  for (std::size_t i = 0; i < examples.size(); ++i) {
    const auto& ex = examples[i];
    const std::string completion = tokenizer.decode(results[i].tokens);
    const bool ok = exact_match(completion, ex.response);
    hits += ok ? 1 : 0;
    if (i < 5) {
      std::string shown = completion;
      std::replace(shown.begin(), shown.end(), '\n', '|');
      log << "  " << ex.prompt << " -> " << shown << (ok ? "  [ok]" : "  [expected " + ex.response + "]") << "\n";
    }
  }
  return static_cast<double>(hits) / static_cast<double>(examples.size());
}

}  // namespace pion::cli
