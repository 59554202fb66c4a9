// Dispatch by kind, and the tokenizer file format (see tokenizer.h).
#include "pion/data/tokenizer.h"

#include <nlohmann/json.hpp>

#include "pion/core/error.h"
#include "pion/core/input.h"
#include "pion/data/text_io.h"

namespace pion {

namespace {

std::string join_kinds() {
  std::string out;
  for (const auto& k : tokenizer_kinds()) out += (out.empty() ? "" : ", ") + k;
  return out;
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace

const std::vector<std::string>& tokenizer_kinds() {
  static const std::vector<std::string> kinds = {"char", "byte", "bpe"};
  return kinds;
}

void Tokenizer::save(const std::string& path) const {
  write_file_atomic(path, to_json());
}

std::unique_ptr<Tokenizer> train_tokenizer(const std::string& kind, std::string_view text,
                                           int vocab_size, const std::string& work_dir) {
  if (kind == "char") return train_char_tokenizer(text);
  if (kind == "byte") {
    check(!text.empty(), "byte tokenizer: the training text is empty");
    validate_utf8(text, "byte tokenizer training text");
    return make_byte_tokenizer();
  }
  if (kind == "bpe") return train_bpe_tokenizer(text, vocab_size, work_dir);
  throw Error("unknown tokenizer kind '" + kind + "'; choose one of " + join_kinds());
}

std::unique_ptr<Tokenizer> tokenizer_from_json(std::string_view json_text,
                                               const std::string& source) {
  // Limited parse and typed reads (pion/core/input.h): every refusal names the file and key.
  const nlohmann::json j = input::parse_json(json_text, source);
  check(j.is_object(), source + " is not a pion tokenizer file (it holds " + input::describe(j) +
                           ", not an object)");
  const auto format = j.find("format");
  check(format != j.end() && format->is_string() && *format == "pion-tokenizer",
        source + " is not a pion tokenizer file (no \"format\": \"pion-tokenizer\")");
  const auto version = j.find("version");
  check(version != j.end() && version->is_number_integer() && *version == 1,
        source + " has an unsupported tokenizer file version " +
            (version == j.end() ? std::string("(none)") : input::describe(*version)) +
            " (this pion reads version 1)");
  const std::string kind = input::to_string(input::member(j, "kind", source), 16,
                                            source + " key 'kind'");
  try {
    if (kind == "byte") return make_byte_tokenizer();
    if (kind == "char") {
      const auto& jvocab = input::member(j, "vocab", source);
      check(jvocab.is_array() && !jvocab.empty() && jvocab.size() <= 65536,
            source + " key 'vocab' must be an array of 1 to 65536 one-character strings, got " +
                input::describe(jvocab));
      std::vector<char32_t> vocab;
      vocab.reserve(jvocab.size());
      for (std::size_t i = 0; i < jvocab.size(); ++i) {
        const std::string where = source + " key 'vocab', entry " + std::to_string(i);
        const std::string s = input::to_string(jvocab[i], 4, where);
        validate_utf8(s, where);
        const auto points = utf8_code_points(s);
        check(points.size() == 1, where + " must be a string of exactly one character, got " +
                                      input::describe(jvocab[i]));
        vocab.push_back(points[0]);
      }
      return make_char_tokenizer(std::move(vocab));
    }
    if (kind == "bpe") {
      const std::string key = "sentencepiece_model_base64";
      const std::string model = base64_decode(
          input::to_string(input::member(j, key, source), input::kMaxJsonBytes,
                           source + " key '" + key + "'"),
          source + " key '" + key + "'");
      return make_bpe_tokenizer(model, source);
    }
  } catch (const Error& e) {
    const std::string what = e.what();
    if (what.find(source) != std::string::npos) throw;
    throw Error(source + ": " + what);
  }
  throw Error(source + ": unknown tokenizer kind '" + kind + "'" +
              "; expected one of " + join_kinds());
}

std::unique_ptr<Tokenizer> load_tokenizer(const std::string& path) {
  const std::string bytes = input::read_file(path, input::kMaxJsonBytes, "tokenizer file");
  check(!bytes.empty(), "tokenizer file '" + path + "' is empty");
  if (ends_with(path, ".model"))
    return make_bpe_tokenizer(bytes, "SentencePiece model '" + path + "'");
  return tokenizer_from_json(bytes, "tokenizer file '" + path + "'");
}

}  // namespace pion
