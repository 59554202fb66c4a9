#pragma once
// Supervised finetuning data: JSONL files of {"prompt": ..., "response": ...} and a batcher
// that puts the loss on the response only.
//
// Each example becomes the token sequence  s = encode(prompt) + encode(response + end_marker)
// (prompt and completion are encoded separately, as they are at generation time, where the
// prompt is encoded alone). The end marker, "\n" by default, is how a finetuned model says
// "answer finished": generation stops at it, and exact_match() compares the text before it.
// Responses should therefore not contain the end marker themselves.
//
// Row layout (T positions): inputs[i] = s[i], targets[i] = s[i + 1] when s[i + 1] belongs
// to the completion, else -1; positions past the end are padded with input id 0 and target
// -1 (padding sits after every real token, so causal attention never lets a real position
// see it). Truncation, when |s| > T + 1: the prompt loses tokens from its START (the answer
// and the prompt's end, e.g. "...=", matter most); if the completion alone is longer than T,
// one prompt token is kept and the completion is cut to its first T tokens (the end marker
// is lost: count_truncated() reports how many examples are cut at all).
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "pion/core/random.h"
#include "pion/data/loader.h"
#include "pion/data/tokenizer.h"

namespace pion {

inline constexpr std::string_view kDefaultEndMarker = "\n";

struct FinetuneExample {
  std::string prompt;
  std::string response;
  bool operator==(const FinetuneExample&) const = default;
};

// Limits of a finetuning JSONL file: its size, one line's length, one line's JSON nesting.
inline constexpr std::size_t kMaxFinetuneFileBytes = std::size_t{1} << 30;
inline constexpr std::size_t kMaxFinetuneLineBytes = std::size_t{1} << 20;
inline constexpr int kMaxFinetuneDepth = 8;

// One object per line; blank lines are skipped; other keys are ignored. Errors name the file
// and line: bad JSON (or JSON nested deeper than kMaxFinetuneDepth, a key twice in one
// object), a line longer than kMaxFinetuneLineBytes, not an object, a missing or non-string
// "prompt" / "response", an empty prompt, or a file with no examples. The file must be a
// regular file of at most kMaxFinetuneFileBytes (pion::input::read_file).
// `pion rl` task files name the second field "answer" (answer_key) instead of "response".
std::vector<FinetuneExample> load_finetune_jsonl(const std::string& path,
                                                 std::string_view answer_key = "response");
// The same over text in memory; `source` names it in errors (the path, for files).
std::vector<FinetuneExample> parse_finetune_jsonl(std::string_view text, const std::string& source,
                                                  std::string_view answer_key = "response");
// Writes one {"prompt", "response"} object per line, atomically.
// (answer_key "answer": a `pion rl` task file).
void write_finetune_jsonl(const std::string& path, std::span<const FinetuneExample> examples,
                          std::string_view answer_key = "response");
// prompt + response + end_marker of every example, concatenated: text to train a tokenizer on.
std::string finetune_text(std::span<const FinetuneExample> examples,
                          std::string_view end_marker = kDefaultEndMarker);

struct TokenizedExample {
  std::vector<std::int32_t> prompt;
  std::vector<std::int32_t> completion;  // response + end marker
};

class FinetuneDataset {
 public:
  FinetuneDataset(std::span<const FinetuneExample> examples, const Tokenizer& tokenizer,
                  std::string end_marker = std::string(kDefaultEndMarker));

  std::size_t size() const { return examples_.size(); }
  const TokenizedExample& example(std::size_t i) const { return examples_.at(i); }
  const std::string& end_marker() const { return end_marker_; }
  // Fills one row of T inputs and targets as described above.
  void fill_row(std::size_t index, std::int64_t seq_len, std::span<std::int32_t> inputs,
                std::span<std::int32_t> targets) const;
  Batch make_batch(std::span<const std::size_t> indices, std::int64_t seq_len) const;
  // Examples whose prompt + completion do not fit seq_len + 1 tokens.
  std::int64_t count_truncated(std::int64_t seq_len) const;

 private:
  std::vector<TokenizedExample> examples_;
  std::string end_marker_;
};

// Batches of examples. next_batch draws B_global example indices uniformly (with
// replacement) from a seeded Rng; each rank keeps its slice, as DataLoader does. eval_batch(k)
// takes examples (k * B_global + j) mod n in order, so evaluation is the same every time.
class FinetuneLoader {
 public:
  FinetuneLoader(FinetuneDataset dataset, const LoaderOptions& options);
  Batch next_batch();
  Batch eval_batch(std::int64_t index) const;
  std::int64_t eval_batches_per_pass() const;  // ceil(n / B_global)
  std::string state() const;                   // JSON, as DataLoader::state
  void set_state(const std::string& state);
  const FinetuneDataset& dataset() const { return dataset_; }
  std::int64_t local_batch_size() const { return options_.batch_size / options_.world_size; }

 private:
  Batch rows_of(std::span<const std::size_t> global_indices) const;

  FinetuneDataset dataset_;
  LoaderOptions options_;
  Rng rng_;
  std::int64_t batches_drawn_ = 0;
};

// True when the generated completion contains the end marker and the text before its first
// occurrence equals `reference` exactly (no trimming: " 357" is wrong for "357"; a completion
// that never ends, i.e. has no end marker, is wrong too: the model must learn to stop).
bool exact_match(std::string_view completion, std::string_view reference,
                 std::string_view end_marker = kDefaultEndMarker);
// Runs of whitespace become one space; leading and trailing whitespace is dropped.
std::string normalize_whitespace(std::string_view text);
// The RL verifier: the completion holds the end marker and the text before its first
// occurrence equals `answer` after normalize_whitespace on both (" 357 " matches "357").
bool answer_matches(std::string_view completion, std::string_view answer,
                    std::string_view end_marker = kDefaultEndMarker);
// Fraction of exact matches of completions[i] against examples[i].response.
double exact_match_rate(std::span<const std::string> completions,
                        std::span<const FinetuneExample> examples,
                        std::string_view end_marker = kDefaultEndMarker);

}  // namespace pion
