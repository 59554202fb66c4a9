#pragma once
// Exact-match accuracy of greedy answers, shared by `pion finetune` and `pion eval`.
#include <ostream>
#include <span>

#include "pion/data/finetune.h"
#include "pion/model/generate.h"
#include "pion/train/session.h"

namespace pion::cli {

// Greedy-decodes each prompt until the end marker (or a length limit) and returns the
// fraction of exact matches; prints a few examples to `log`.
double exact_match_accuracy(Llama<float>& model, const Tokenizer& tokenizer,
                            std::span<const FinetuneExample> examples, std::ostream& log);
// The same decoding with any generator (cli/run_on_device.h's generator_on_device: `pion eval
// --device cuda` answers on the GPU).
double exact_match_accuracy(const TokenGenerator& generator, const Tokenizer& tokenizer,
                            std::span<const FinetuneExample> examples, std::ostream& log);

}  // namespace pion::cli
