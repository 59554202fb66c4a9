#include "pion/data/finetune.h"

#include <algorithm>
#include <nlohmann/json.hpp>

#include "pion/core/error.h"
#include "pion/core/input.h"
#include "pion/data/text_io.h"

namespace pion {

std::vector<FinetuneExample> parse_finetune_jsonl(std::string_view text,
                                                  const std::string& source,
                                                  std::string_view answer_key) {
  const std::string example = R"({"prompt": "12+34=", "response": "46"})";
  check(text.size() <= kMaxFinetuneFileBytes,
        "finetuning file '" + source + "' is " + std::to_string(text.size()) +
            " bytes, more than the " + std::to_string(kMaxFinetuneFileBytes) + " allowed");
  std::vector<FinetuneExample> examples;
  std::size_t pos = 0;
  for (std::size_t line_number = 1; pos < text.size(); ++line_number) {
    const std::size_t end = std::min(text.find('\n', pos), text.size());
    const std::string_view line = text.substr(pos, end - pos);
    pos = end + 1;
    if (line.find_first_not_of(" \t\r") == std::string_view::npos) continue;
    const std::string where = "line " + std::to_string(line_number) + " of '" + source + "'";
    check(line.size() <= kMaxFinetuneLineBytes,
          where + " is " + std::to_string(line.size()) + " bytes long, more than the " +
              std::to_string(kMaxFinetuneLineBytes) + " a finetuning example may be");
    nlohmann::json j;
    try {
      // One flat object per line: a few levels of nesting are plenty (other keys are ignored).
      j = input::parse_json(line, where, kMaxFinetuneLineBytes, kMaxFinetuneDepth);
    } catch (const Error& e) {
      throw Error(std::string(e.what()) + "; each line must be one object like " + example);
    }
    check(j.is_object(), where + " is not a JSON object (it is " + input::describe(j) +
                             "); expected " + R"({"prompt": ..., "response": ...})");
    std::string fields[2];
    int k = 0;
    for (const std::string& key : {std::string("prompt"), std::string(answer_key)}) {
      const auto it = j.find(key);
      check(it != j.end(), where + " has no \"" + key + "\" key");
      check(it->is_string(),
            where + ": \"" + key + "\" must be a string, got " + input::describe(*it));
      fields[k++] = it->get<std::string>();
    }
    FinetuneExample ex{std::move(fields[0]), std::move(fields[1])};
    check(!ex.prompt.empty(),
          where + " has an empty \"prompt\"; the first response token needs a context");
    examples.push_back(std::move(ex));
  }
  check(!examples.empty(), "finetuning file '" + source +
                               "' holds no examples; expected JSONL lines like " + example);
  return examples;
}

std::vector<FinetuneExample> load_finetune_jsonl(const std::string& path,
                                                 std::string_view answer_key) {
  return parse_finetune_jsonl(input::read_file(path, kMaxFinetuneFileBytes, "finetuning file"),
                              path, answer_key);
}

void write_finetune_jsonl(const std::string& path, std::span<const FinetuneExample> examples,
                          std::string_view answer_key) {
  std::string out;
  for (const auto& ex : examples) {
    out += nlohmann::json{{"prompt", ex.prompt}, {std::string(answer_key), ex.response}}.dump();
    out += '\n';
  }
  write_file_atomic(path, out);
}

std::string finetune_text(std::span<const FinetuneExample> examples, std::string_view end_marker) {
  std::string out;
  for (const auto& ex : examples) {
    out += ex.prompt;
    out += ex.response;
    out += end_marker;
  }
  return out;
}

FinetuneDataset::FinetuneDataset(std::span<const FinetuneExample> examples,
                                 const Tokenizer& tokenizer, std::string end_marker)
    : end_marker_(std::move(end_marker)) {
  check(!examples.empty(), "finetuning dataset: no examples");
  check(!end_marker_.empty(), "finetuning dataset: the end marker must not be empty");
  examples_.reserve(examples.size());
  for (std::size_t i = 0; i < examples.size(); ++i) {
    TokenizedExample t;
    try {
      t.prompt = tokenizer.encode(examples[i].prompt);
      t.completion = tokenizer.encode(examples[i].response + end_marker_);
    } catch (const Error& e) {
      throw Error("finetuning example " + std::to_string(i) + ": " + e.what());
    }
    check(!t.prompt.empty(),
          "finetuning example " + std::to_string(i) + ": the prompt encodes to no tokens");
    examples_.push_back(std::move(t));
  }
}

void FinetuneDataset::fill_row(std::size_t index, std::int64_t seq_len,
                               std::span<std::int32_t> inputs,
                               std::span<std::int32_t> targets) const {
  check(seq_len >= 1, "seq_len must be >= 1");
  const auto t = static_cast<std::size_t>(seq_len);
  check(inputs.size() == t && targets.size() == t, "fill_row: rows must hold seq_len entries");
  const TokenizedExample& ex = examples_.at(index);
  // Truncation (see finetune.h): keep the completion's first T tokens at most, then as much
  // of the prompt's END as fits in T + 1 tokens, at least one prompt token.
  const std::size_t completion_len = std::min(ex.completion.size(), t);
  const std::size_t prompt_len = std::min(ex.prompt.size(), t + 1 - completion_len);
  const std::size_t length = prompt_len + completion_len;  // <= T + 1
  const auto token = [&](std::size_t i) {
    return i < prompt_len ? ex.prompt[ex.prompt.size() - prompt_len + i]
                          : ex.completion[i - prompt_len];
  };
  for (std::size_t i = 0; i < t; ++i) {
    if (i + 1 < length) {
      inputs[i] = token(i);
      targets[i] = i + 1 >= prompt_len ? token(i + 1) : -1;
    } else {
      // The last real token is still an input (nothing to predict after it), then padding.
      inputs[i] = i < length ? token(i) : 0;
      targets[i] = -1;
    }
  }
}

Batch FinetuneDataset::make_batch(std::span<const std::size_t> indices,
                                  std::int64_t seq_len) const {
  Batch b;
  b.rows = static_cast<std::int64_t>(indices.size());
  b.seq_len = seq_len;
  const auto t = static_cast<std::size_t>(seq_len);
  b.inputs.resize(indices.size() * t);
  b.targets.resize(indices.size() * t);
  for (std::size_t r = 0; r < indices.size(); ++r)
    fill_row(indices[r], seq_len, std::span(b.inputs).subspan(r * t, t),
             std::span(b.targets).subspan(r * t, t));
  return b;
}

std::int64_t FinetuneDataset::count_truncated(std::int64_t seq_len) const {
  return std::count_if(examples_.begin(), examples_.end(), [&](const TokenizedExample& ex) {
    return static_cast<std::int64_t>(ex.prompt.size() + ex.completion.size()) > seq_len + 1;
  });
}

FinetuneLoader::FinetuneLoader(FinetuneDataset dataset, const LoaderOptions& options)
    : dataset_(std::move(dataset)), options_(options), rng_(options.seed) {
  validate_rank_slicing(options_.batch_size, options_.rank, options_.world_size);
  check(options_.seq_len >= 1, "seq_len must be >= 1, got " + std::to_string(options_.seq_len));
}

Batch FinetuneLoader::rows_of(std::span<const std::size_t> global_indices) const {
  const auto rows = static_cast<std::size_t>(local_batch_size());
  return dataset_.make_batch(
      global_indices.subspan(static_cast<std::size_t>(options_.rank) * rows, rows),
      options_.seq_len);
}

Batch FinetuneLoader::next_batch() {
  std::vector<std::size_t> indices(static_cast<std::size_t>(options_.batch_size));
  for (auto& i : indices) i = static_cast<std::size_t>(rng_.below(dataset_.size()));
  ++batches_drawn_;
  return rows_of(indices);
}

Batch FinetuneLoader::eval_batch(std::int64_t index) const {
  check(index >= 0, "eval batch index must be >= 0, got " + std::to_string(index));
  std::vector<std::size_t> indices(static_cast<std::size_t>(options_.batch_size));
  for (std::size_t j = 0; j < indices.size(); ++j)
    indices[j] = (static_cast<std::size_t>(index) * indices.size() + j) % dataset_.size();
  return rows_of(indices);
}

std::int64_t FinetuneLoader::eval_batches_per_pass() const {
  const auto n = static_cast<std::int64_t>(dataset_.size());
  return (n + options_.batch_size - 1) / options_.batch_size;
}

std::string FinetuneLoader::state() const {
  const auto s = rng_.state();
  return nlohmann::json{
      {"rng", {s[0], s[1], s[2], s[3]}}, {"batches", batches_drawn_}, {"examples", dataset_.size()}}
      .dump();
}

void FinetuneLoader::set_state(const std::string& state) {
  const LoaderPosition p = parse_loader_position(state, "examples", "finetune loader");
  check(static_cast<std::size_t>(p.count) == dataset_.size(),
        "finetune loader state was saved over " + std::to_string(p.count) +
            " examples but this dataset has " + std::to_string(dataset_.size()) +
            "; resume with the same data");
  rng_.set_state(p.rng);
  batches_drawn_ = p.batches;
}

bool exact_match(std::string_view completion, std::string_view reference,
                 std::string_view end_marker) {
  const std::size_t end = completion.find(end_marker);
  return end != std::string_view::npos && completion.substr(0, end) == reference;
}

std::string normalize_whitespace(std::string_view text) {
  std::string out;
  bool space = false;
  for (char c : text) {
    if (c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v') {
      space = !out.empty();
      continue;
    }
    if (space) out.push_back(' ');
    space = false;
    out.push_back(c);
  }
  return out;
}

bool answer_matches(std::string_view completion, std::string_view answer,
                    std::string_view end_marker) {
  const std::size_t end = completion.find(end_marker);
  return end != std::string_view::npos &&
         normalize_whitespace(completion.substr(0, end)) == normalize_whitespace(answer);
}

double exact_match_rate(std::span<const std::string> completions,
                        std::span<const FinetuneExample> examples, std::string_view end_marker) {
  check(completions.size() == examples.size() && !examples.empty(),
        "exact_match_rate: need one completion per example (got " +
            std::to_string(completions.size()) + " completions for " +
            std::to_string(examples.size()) + " examples)");
  std::size_t hits = 0;
  for (std::size_t i = 0; i < examples.size(); ++i)
    hits += exact_match(completions[i], examples[i].response, end_marker);
  return static_cast<double>(hits) / static_cast<double>(examples.size());
}

}  // namespace pion
