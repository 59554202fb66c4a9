#include "cli/exact_match_eval.h"

#include <algorithm>

namespace pion::cli {

double exact_match_accuracy(Llama<float>& model, const Tokenizer& tokenizer,
                            std::span<const FinetuneExample> examples, std::ostream& log) {
  if (examples.empty()) return 0.0;
  Rng unused(0);
  std::size_t hits = 0;
  for (std::size_t i = 0; i < examples.size(); ++i) {
    const auto& ex = examples[i];
    SampleOptions opts;
    opts.temperature = 0.0;
    opts.stop = std::string(kDefaultEndMarker);
    opts.max_new_tokens = static_cast<int>(tokenizer.encode(ex.response).size()) + 8;
    const std::string completion = generate(model, tokenizer, ex.prompt, opts, unused);
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
