#pragma once
// Turns a text file into a dataset directory the trainer reads:
//   out_dir/train.bin, out_dir/val.bin   llm.c uint16 token shards (shard.h)
//   out_dir/tokenizer.json               the tokenizer (tokenizer.h)
//   out_dir/meta.json                    the summary below, written last: its presence means
//                                        the directory is complete
// The split is by characters, nanoGPT style: the first (1 - val_fraction) of the text's code
// points train, the rest validate. The bpe tokenizer is trained on the training part only.
// The char vocabulary is taken from the WHOLE text (as nanoGPT's prepare.py does): it holds no
// statistics, and a character seen only in the validation part (the built-in corpus has
// one) would otherwise make the validation text unencodable.
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

namespace pion {

struct DatasetSummary {
  std::string dir;
  std::string train_path, val_path, tokenizer_path;
  std::string source;  // where the text came from
  std::string tokenizer_kind;
  int vocab_size = 0;
  double val_fraction = 0.0;
  std::int64_t train_chars = 0, val_chars = 0;  // Unicode code points
  std::int64_t train_tokens = 0, val_tokens = 0;

  nlohmann::json to_json() const;
};

// Reads `text_path` (non-empty, valid UTF-8) and writes the dataset to `out_dir` (created if
// needed). vocab_size is used by bpe only. val_fraction must be in (0, 1) and leave both
// parts non-empty.
DatasetSummary prepare_dataset(const std::string& text_path, const std::string& tokenizer_kind,
                               int vocab_size, const std::string& out_dir,
                               double val_fraction = 0.1);
// The same from text in memory; `source` names it in the summary and error messages.
DatasetSummary prepare_dataset_from_text(std::string_view text, const std::string& source,
                                         const std::string& tokenizer_kind, int vocab_size,
                                         const std::string& out_dir, double val_fraction = 0.1);

// True when `dir` holds a complete prepared dataset (its meta.json exists).
bool is_prepared_dataset(const std::string& dir);
// Reads out_dir/meta.json and checks the files it names exist (clear errors otherwise).
DatasetSummary load_dataset_summary(const std::string& dir);

}  // namespace pion
