// The byte tokenizer: id = byte value. It needs no training and encodes any UTF-8 text.
#include <nlohmann/json.hpp>

#include "pion/core/error.h"
#include "pion/data/text_io.h"
#include "pion/data/tokenizer.h"

namespace pion {

namespace {

class ByteTokenizer final : public Tokenizer {
 public:
  std::string kind() const override { return "byte"; }
  int vocab_size() const override { return 256; }

  std::vector<std::int32_t> encode(std::string_view text) const override {
    validate_utf8(text, "text to encode");
    std::vector<std::int32_t> ids(text.size());
    for (std::size_t i = 0; i < text.size(); ++i) ids[i] = static_cast<unsigned char>(text[i]);
    return ids;
  }

  // Returns the raw bytes: a window cut in the middle of a multi-byte character decodes to
  // bytes that are not valid UTF-8 on their own, which is what a byte model can emit.
  std::string decode(std::span<const std::int32_t> ids) const override {
    std::string out(ids.size(), '\0');
    for (std::size_t i = 0; i < ids.size(); ++i) {
      check(ids[i] >= 0 && ids[i] < 256, "byte tokenizer: id " + std::to_string(ids[i]) +
                                             " at position " + std::to_string(i) +
                                             " is outside the vocabulary [0, 256)");
      out[i] = static_cast<char>(static_cast<unsigned char>(ids[i]));
    }
    return out;
  }

  std::string to_json() const override {
    nlohmann::json j = {{"format", "pion-tokenizer"}, {"version", 1}, {"kind", "byte"}};
    return j.dump(1) + "\n";
  }
};

}  // namespace

std::unique_ptr<Tokenizer> make_byte_tokenizer() {
  return std::make_unique<ByteTokenizer>();
}

}  // namespace pion
