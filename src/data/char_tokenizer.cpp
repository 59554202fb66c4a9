// The character tokenizer: id i is the i-th smallest code point of the training text.
#include <algorithm>
#include <array>
#include <nlohmann/json.hpp>

#include "pion/core/error.h"
#include "pion/data/text_io.h"
#include "pion/data/tokenizer.h"

namespace pion {

namespace {

class CharTokenizer final : public Tokenizer {
 public:
  explicit CharTokenizer(std::vector<char32_t> vocab) : vocab_(std::move(vocab)) {
    check(!vocab_.empty(), "char tokenizer: the vocabulary is empty");
    check(vocab_.size() <= 65536, "char tokenizer: " + std::to_string(vocab_.size()) +
                                      " characters do not fit uint16 token shards (max 65536)");
    for (std::size_t i = 0; i < vocab_.size(); ++i) {
      check(vocab_[i] <= 0x10FFFF && !(vocab_[i] >= 0xD800 && vocab_[i] <= 0xDFFF),
            "char tokenizer: vocabulary entry " + std::to_string(i) +
                " is not a Unicode scalar value");
      check(i == 0 || vocab_[i - 1] < vocab_[i],
            "char tokenizer: the vocabulary must be sorted and free of duplicates (entry " +
                std::to_string(i) + ")");
    }
    // A direct table for the common case (Latin-1 range); binary search for the rest.
    latin1_.fill(-1);
    for (std::size_t i = 0; i < vocab_.size() && vocab_[i] < latin1_.size(); ++i)
      latin1_[vocab_[i]] = static_cast<std::int32_t>(i);
  }

  std::string kind() const override { return "char"; }
  int vocab_size() const override { return static_cast<int>(vocab_.size()); }

  std::vector<std::int32_t> encode(std::string_view text) const override {
    validate_utf8(text, "text to encode");
    std::vector<std::int32_t> ids;
    ids.reserve(text.size());
    const std::vector<char32_t> points = utf8_code_points(text);
    for (std::size_t i = 0; i < points.size(); ++i) {
      const char32_t cp = points[i];
      const std::int32_t id = lookup(cp);
      if (id < 0) {
        throw Error("character " + describe_code_point(cp) + " at byte offset " +
                    std::to_string(utf8_offset_of_code_point(text, i)) +
                    " is not in the char tokenizer's vocabulary (" + std::to_string(vocab_.size()) +
                    " characters, taken from its training text); build the vocabulary from text "
                    "that contains it, or use the byte or bpe tokenizer");
      }
      ids.push_back(id);
    }
    return ids;
  }

  std::string decode(std::span<const std::int32_t> ids) const override {
    std::string out;
    out.reserve(ids.size());
    for (std::size_t i = 0; i < ids.size(); ++i) {
      const std::int32_t id = ids[i];
      check(id >= 0 && id < vocab_size(),
            "char tokenizer: id " + std::to_string(id) + " at position " + std::to_string(i) +
                " is outside the vocabulary [0, " + std::to_string(vocab_size()) + ")");
      append_utf8(out, vocab_[static_cast<std::size_t>(id)]);
    }
    return out;
  }

  std::string to_json() const override {
    nlohmann::json vocab = nlohmann::json::array();
    for (char32_t cp : vocab_) {
      std::string s;
      append_utf8(s, cp);
      vocab.push_back(s);
    }
    nlohmann::json j = {
        {"format", "pion-tokenizer"}, {"version", 1}, {"kind", "char"}, {"vocab", vocab}};
    return j.dump(1) + "\n";
  }

 private:
  std::int32_t lookup(char32_t cp) const {
    if (cp < latin1_.size()) return latin1_[cp];
    const auto it = std::lower_bound(vocab_.begin(), vocab_.end(), cp);
    if (it == vocab_.end() || *it != cp) return -1;
    return static_cast<std::int32_t>(it - vocab_.begin());
  }

  std::vector<char32_t> vocab_;
  std::array<std::int32_t, 256> latin1_{};
};

}  // namespace

std::unique_ptr<Tokenizer> make_char_tokenizer(std::vector<char32_t> vocab) {
  return std::make_unique<CharTokenizer>(std::move(vocab));
}

std::unique_ptr<Tokenizer> train_char_tokenizer(std::string_view text) {
  check(!text.empty(), "char tokenizer: the training text is empty");
  validate_utf8(text, "char tokenizer training text");
  std::vector<char32_t> vocab = utf8_code_points(text);
  std::sort(vocab.begin(), vocab.end());
  vocab.erase(std::unique(vocab.begin(), vocab.end()), vocab.end());
  return make_char_tokenizer(std::move(vocab));
}

}  // namespace pion
