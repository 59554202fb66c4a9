// Dispatch by kind, and the tokenizer file format (see tokenizer.h).
#include "pion/data/tokenizer.h"

#include <nlohmann/json.hpp>

#include "pion/core/error.h"
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
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(json_text);
  } catch (const nlohmann::json::parse_error& e) {
    throw Error(source + " is not valid JSON (" + e.what() +
                "); expected a tokenizer file written by pion");
  }
  check(j.is_object() && j.value("format", "") == "pion-tokenizer",
        source + " is not a pion tokenizer file (no \"format\": \"pion-tokenizer\")");
  check(j.value("version", 0) == 1, source + " has an unsupported tokenizer file version " +
                                        j.value("version", nlohmann::json(nullptr)).dump() +
                                        " (this pion reads version 1)");
  const std::string kind = j.value("kind", "");
  if (kind == "byte") return make_byte_tokenizer();
  if (kind == "char") {
    check(j.contains("vocab") && j["vocab"].is_array(),
          source + ": a char tokenizer needs a \"vocab\" array");
    std::vector<char32_t> vocab;
    for (std::size_t i = 0; i < j["vocab"].size(); ++i) {
      const auto& entry = j["vocab"][i];
      const std::string s = entry.is_string() ? entry.get<std::string>() : std::string();
      const auto points = utf8_code_points(s);
      check(points.size() == 1, source + ": char vocab entry " + std::to_string(i) +
                                    " must be a string of exactly one character, got " +
                                    entry.dump());
      vocab.push_back(points[0]);
    }
    return make_char_tokenizer(std::move(vocab));
  }
  if (kind == "bpe") {
    check(j.contains("sentencepiece_model_base64") && j["sentencepiece_model_base64"].is_string(),
          source + ": a bpe tokenizer needs a \"sentencepiece_model_base64\" string");
    const std::string model =
        base64_decode(j["sentencepiece_model_base64"].get<std::string>(), source);
    return make_bpe_tokenizer(model, source);
  }
  throw Error(source + ": unknown tokenizer kind '" + kind + "'; expected one of " + join_kinds());
}

std::unique_ptr<Tokenizer> load_tokenizer(const std::string& path) {
  const std::string bytes = read_file_bytes(path);
  check(!bytes.empty(), "tokenizer file '" + path + "' is empty");
  if (ends_with(path, ".model"))
    return make_bpe_tokenizer(bytes, "SentencePiece model '" + path + "'");
  return tokenizer_from_json(bytes, "tokenizer file '" + path + "'");
}

}  // namespace pion
