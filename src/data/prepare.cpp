#include "pion/data/prepare.h"

#include <cmath>
#include <filesystem>
#include <limits>

#include "pion/core/error.h"
#include "pion/core/input.h"
#include "pion/data/shard.h"
#include "pion/data/text_io.h"
#include "pion/data/tokenizer.h"

namespace pion {

namespace fs = std::filesystem;

// meta.json is a dozen keys; anything much larger is not one.
constexpr std::uint64_t kMaxMetaBytes = 1 << 20;

nlohmann::json DatasetSummary::to_json() const {
  return {{"format", "pion-dataset"},
          {"version", 1},
          {"source", source},
          {"tokenizer_kind", tokenizer_kind},
          {"vocab_size", vocab_size},
          {"val_fraction", val_fraction},
          {"train_chars", train_chars},
          {"val_chars", val_chars},
          {"train_tokens", train_tokens},
          {"val_tokens", val_tokens},
          {"train", "train.bin"},
          {"val", "val.bin"},
          {"tokenizer", "tokenizer.json"}};
}

DatasetSummary prepare_dataset(const std::string& text_path, const std::string& tokenizer_kind,
                               int vocab_size, const std::string& out_dir, double val_fraction) {
  const std::string text = read_text_file(text_path);
  return prepare_dataset_from_text(text, text_path, tokenizer_kind, vocab_size, out_dir,
                                   val_fraction);
}

DatasetSummary prepare_dataset_from_text(std::string_view text, const std::string& source,
                                         const std::string& tokenizer_kind, int vocab_size,
                                         const std::string& out_dir, double val_fraction) {
  check(std::isfinite(val_fraction) && val_fraction > 0.0 && val_fraction < 1.0,
        "val_fraction must be in (0, 1), got " + std::to_string(val_fraction));
  check(!text.empty(), "the text of '" + source + "' is empty; give some text to train on");
  validate_utf8(text, "text '" + source + "'");

  const std::size_t chars = utf8_length(text);
  const auto train_chars =
      static_cast<std::size_t>(std::floor(static_cast<double>(chars) * (1.0 - val_fraction)));
  check(train_chars > 0 && train_chars < chars,
        "'" + source + "' has " + std::to_string(chars) +
            " characters: too few to split with val_fraction " + std::to_string(val_fraction) +
            " into non-empty training and validation parts");
  const std::size_t split = utf8_offset_of_code_point(text, train_chars);
  const std::string_view train_text = text.substr(0, split);
  const std::string_view val_text = text.substr(split);

  const auto tokenizer = tokenizer_kind == "char"
                             ? train_tokenizer("char", text)  // whole text: see prepare.h
                             : train_tokenizer(tokenizer_kind, train_text, vocab_size, out_dir);
  check(tokenizer->vocab_size() <= 65536, "vocabulary of " +
                                              std::to_string(tokenizer->vocab_size()) +
                                              " does not fit uint16 token shards (max 65536)");

  std::error_code ec;
  fs::create_directories(out_dir, ec);
  check(!ec && fs::is_directory(out_dir),
        "cannot create dataset directory '" + out_dir + "': " + ec.message());
  // Remove a stale meta.json first so a crash half way never leaves a "complete" directory.
  fs::remove(fs::path(out_dir) / "meta.json", ec);

  DatasetSummary s;
  s.dir = out_dir;
  s.train_path = (fs::path(out_dir) / "train.bin").string();
  s.val_path = (fs::path(out_dir) / "val.bin").string();
  s.tokenizer_path = (fs::path(out_dir) / "tokenizer.json").string();
  s.source = source;
  s.tokenizer_kind = tokenizer->kind();
  s.vocab_size = tokenizer->vocab_size();
  s.val_fraction = val_fraction;
  s.train_chars = static_cast<std::int64_t>(train_chars);
  s.val_chars = static_cast<std::int64_t>(chars - train_chars);

  const auto train_tokens = to_uint16_tokens(tokenizer->encode(train_text));
  const auto val_tokens = to_uint16_tokens(tokenizer->encode(val_text));
  s.train_tokens = static_cast<std::int64_t>(train_tokens.size());
  s.val_tokens = static_cast<std::int64_t>(val_tokens.size());
  write_shard(s.train_path, train_tokens);
  write_shard(s.val_path, val_tokens);
  tokenizer->save(s.tokenizer_path);
  write_file_atomic((fs::path(out_dir) / "meta.json").string(), s.to_json().dump(1) + "\n");
  return s;
}

bool is_prepared_dataset(const std::string& dir) {
  std::error_code ec;
  return fs::is_regular_file(fs::path(dir) / "meta.json", ec);
}

DatasetSummary load_dataset_summary(const std::string& dir) {
  const std::string meta_path = (fs::path(dir) / "meta.json").string();
  check(
      is_prepared_dataset(dir),
      "'" + dir + "' is not a prepared dataset (no meta.json); prepare it from a text file first");
  // Limited read and parse, typed reads with ranges (pion/core/input.h): a garbage meta.json
  // is refused naming the file and the key.
  const nlohmann::json j = input::read_json_file(meta_path, "dataset metadata", kMaxMetaBytes);
  const std::string where = "dataset metadata '" + meta_path + "'";
  const auto format = j.is_object() ? j.find("format") : j.end();
  const auto version = j.is_object() ? j.find("version") : j.end();
  check(j.is_object() && format != j.end() && *format == "pion-dataset" && version != j.end() &&
            *version == 1,
        "'" + meta_path + "' is not pion dataset metadata (version 1); prepare the dataset again");
  const auto key = [&](const char* k) { return where + " key '" + k + "'"; };
  const auto str = [&](const char* k) {
    return input::to_string(input::member(j, k, where), 4096, key(k));
  };
  const auto count = [&](const char* k) {
    return input::to_int(input::member(j, k, where), 0, std::numeric_limits<std::int64_t>::max(),
                         key(k));
  };
  const auto file = [&](const char* k) {
    const std::string name = str(k);
    check(!name.empty() && name.find('/') == std::string::npos && name != "." && name != "..",
          key(k) + " must name a file inside the dataset directory, got " +
              input::describe(j[k]));
    return (fs::path(dir) / name).string();
  };
  DatasetSummary s;
  s.dir = dir;
  s.train_path = file("train");
  s.val_path = file("val");
  s.tokenizer_path = file("tokenizer");
  s.source = str("source");
  s.tokenizer_kind = str("tokenizer_kind");
  // Token shards are uint16: at most 65536 distinct ids.
  s.vocab_size = input::to_int32(input::member(j, "vocab_size", where), 1, 65536, key("vocab_size"));
  s.val_fraction = input::to_double(input::member(j, "val_fraction", where), 0.0, 1.0,
                                    key("val_fraction"), true, true);
  s.train_chars = count("train_chars");
  s.val_chars = count("val_chars");
  s.train_tokens = count("train_tokens");
  s.val_tokens = count("val_tokens");
  for (const auto& p : {s.train_path, s.val_path, s.tokenizer_path})
    check(fs::is_regular_file(p),
          "dataset '" + dir + "' is incomplete: '" + p + "' is missing; prepare it again");
  return s;
}

}  // namespace pion
