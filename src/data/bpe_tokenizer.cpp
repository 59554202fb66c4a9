// The SentencePiece BPE tokenizer. SentencePiece's defaults are made for translation (NFKC
// normalisation, collapsed whitespace, a dummy leading space, <unk> for unseen characters),
// each of which breaks decode(encode(s)) == s on raw LM text, so training switches them off
// and turns byte fallback on.
#include <algorithm>
#include <nlohmann/json.hpp>
#include <unordered_map>
#include <unordered_set>

#include "pion/core/error.h"
#include "pion/data/text_io.h"
#include "pion/data/tokenizer.h"

#ifdef PION_HAVE_SENTENCEPIECE
#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>
#endif

namespace pion {

bool have_sentencepiece() {
#ifdef PION_HAVE_SENTENCEPIECE
  return true;
#else
  return false;
#endif
}

#ifdef PION_HAVE_SENTENCEPIECE

namespace {

// The training sentences: the non-empty lines of the text. Lines never contain '\n', so no
// learned piece spans a newline; at encode time '\n' becomes the byte-fallback piece <0x0A>.
class LineIterator final : public sentencepiece::SentenceIterator {
 public:
  explicit LineIterator(std::string_view text) : text_(text) { Next(); }
  bool done() const override { return done_; }
  void Next() override {
    while (pos_ < text_.size()) {
      const std::size_t end = std::min(text_.find('\n', pos_), text_.size());
      line_.assign(text_.substr(pos_, end - pos_));
      pos_ = end + 1;
      if (!line_.empty()) return;
    }
    done_ = true;
  }
  const std::string& value() const override { return line_; }
  sentencepiece::util::Status status() const override { return {}; }

 private:
  std::string_view text_;
  std::size_t pos_ = 0;
  std::string line_;
  bool done_ = false;
};

class BpeTokenizer final : public Tokenizer {
 public:
  BpeTokenizer(const std::string& model_bytes, const std::string& source)
      : model_bytes_(model_bytes) {
    const auto status = processor_.LoadFromSerializedProto(model_bytes_);
    check(status.ok(), source + " is not a valid SentencePiece model: " + status.ToString());
    check(processor_.GetPieceSize() <= 65536,
          source + " has " + std::to_string(processor_.GetPieceSize()) +
              " pieces; uint16 token shards hold at most 65536");
  }

  std::string kind() const override { return "bpe"; }
  int vocab_size() const override { return processor_.GetPieceSize(); }

  std::vector<std::int32_t> encode(std::string_view text) const override {
    validate_utf8(text, "text to encode");
    std::vector<int> ids;
    const auto status = processor_.Encode(text, &ids);
    check(status.ok(), "SentencePiece could not encode the text: " + status.ToString());
    return {ids.begin(), ids.end()};
  }

  std::string decode(std::span<const std::int32_t> ids) const override {
    for (std::size_t i = 0; i < ids.size(); ++i)
      check(ids[i] >= 0 && ids[i] < vocab_size(),
            "bpe tokenizer: id " + std::to_string(ids[i]) + " at position " + std::to_string(i) +
                " is outside the vocabulary [0, " + std::to_string(vocab_size()) + ")");
    std::string out;
    const auto status = processor_.Decode(std::vector<int>(ids.begin(), ids.end()), &out);
    check(status.ok(), "SentencePiece could not decode the ids: " + status.ToString());
    return out;
  }

  std::string to_json() const override {
    nlohmann::json j = {{"format", "pion-tokenizer"},
                        {"version", 1},
                        {"kind", "bpe"},
                        {"vocab_size", vocab_size()},
                        {"sentencepiece_model_base64", base64_encode(model_bytes_)}};
    return j.dump(1) + "\n";
  }
  std::string sentencepiece_model() const override { return model_bytes_; }
  int bos_id() const override { return processor_.bos_id(); }
  int eos_id() const override { return processor_.eos_id(); }

 private:
  std::string model_bytes_;
  sentencepiece::SentencePieceProcessor processor_;
};

}  // namespace

std::unique_ptr<Tokenizer> make_bpe_tokenizer(const std::string& model_bytes,
                                              const std::string& source) {
  return std::make_unique<BpeTokenizer>(model_bytes, source);
}

std::unique_ptr<Tokenizer> train_bpe_tokenizer(
    std::string_view text, int vocab_size,
    const std::string& /*work_dir: training runs in memory*/) {
  check(!text.empty(), "bpe tokenizer: the training text is empty");
  validate_utf8(text, "bpe tokenizer training text");
  // Every distinct character becomes a piece (character_coverage = 1), plus 256 byte pieces
  // and <unk>; asking for less makes SentencePiece fail with a less helpful message.
  std::unordered_set<char32_t> distinct;
  for (char32_t cp : utf8_code_points(text))
    if (cp != '\n') distinct.insert(cp == ' ' ? U'\u2581' : cp);  // ' ' is stored as U+2581
  const int minimum = 1 + 256 + static_cast<int>(distinct.size());
  check(vocab_size >= minimum && vocab_size <= 65536,
        "bpe vocab_size " + std::to_string(vocab_size) +
            " is out of range: this text needs at least " + std::to_string(minimum) +
            " (1 <unk> + 256 byte-fallback pieces + " + std::to_string(distinct.size()) +
            " distinct characters) and uint16 token shards allow at most 65536");

  const std::unordered_map<std::string, std::string> options = {
      {"model_type", "bpe"},
      {"vocab_size", std::to_string(vocab_size)},
      {"character_coverage", "1.0"},
      {"normalization_rule_name", "identity"},
      {"add_dummy_prefix", "false"},
      {"remove_extra_whitespaces", "false"},
      {"byte_fallback", "true"},
      {"split_digits", "true"},  // digits one by one: arithmetic tasks stay learnable
      {"unk_id", "0"},
      {"bos_id", "-1"},
      {"eos_id", "-1"},
      {"pad_id", "-1"},
      {"max_sentence_length", "1000000"},  // do not silently drop long lines
      {"input_sentence_size", "0"},        // use every line: no sampling, deterministic
      {"shuffle_input_sentence", "false"},
      {"num_threads", "1"},  // one thread: the same model on every machine
      {"minloglevel", "2"},  // SentencePiece logs every merge at INFO level otherwise
  };
  LineIterator lines(text);
  std::string model_bytes;
  const auto status = sentencepiece::SentencePieceTrainer::Train(options, &lines, &model_bytes);
  check(status.ok(),
        "SentencePiece BPE training failed (vocab_size " + std::to_string(vocab_size) +
            "): " + status.ToString() +
            ". A vocabulary larger than the text supports also fails: try a smaller one.");
  return make_bpe_tokenizer(model_bytes, "the trained SentencePiece model");
}

#else  // !PION_HAVE_SENTENCEPIECE

namespace {
[[noreturn]] void no_sentencepiece() {
  throw Error(
      "this pion was built without SentencePiece, so the bpe tokenizer is unavailable; install it "
      "(apt-get install libsentencepiece-dev), re-run cmake and rebuild, or use the char or byte "
      "tokenizer");
}
}  // namespace

std::unique_ptr<Tokenizer> make_bpe_tokenizer(const std::string&, const std::string&) {
  no_sentencepiece();
}
std::unique_ptr<Tokenizer> train_bpe_tokenizer(std::string_view, int, const std::string&) {
  no_sentencepiece();
}

#endif

}  // namespace pion
