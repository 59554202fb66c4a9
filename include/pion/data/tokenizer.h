#pragma once
// Tokenizers behind one interface. Three kinds:
//   char  the sorted set of Unicode code points seen in the training text (nanoGPT's
//         character model: full tinyshakespeare gives 65). Encoding a character that is not
//         in the vocabulary is an error naming the character and its offset (there is no
//         <unk> id: a silent substitute would train the model on a lie).
//   byte  the 256 byte values; encodes anything, decode returns the raw bytes.
//   bpe   SentencePiece BPE (libsentencepiece) trained on the text, with the identity
//         normaliser, no dummy prefix, kept whitespace and byte fallback, so that
//         decode(encode(s)) == s for every valid UTF-8 string, newlines included. Only the
//         <unk> special piece is kept (no BOS/EOS), so the vocabulary is at least
//         1 + 256 + (distinct characters in the training text).
//         One exception to the round trip: SentencePiece stores a space as U+2581 '▁', so a
//         literal U+2581 in the input decodes as a space. Digits are split one by one
//         (split_digits), which keeps arithmetic tasks learnable. Training is single-threaded
//         over every non-empty line, so the same text and vocab_size give the same model.
//
// Saved format (one file, usually tokenizer.json): a JSON object
//   {"format": "pion-tokenizer", "version": 1, "kind": "char"|"byte"|"bpe", ...}
// with "vocab": [one-character strings in id order] for char, and
// "sentencepiece_model_base64": the serialized SentencePiece ModelProto for bpe.
// load_tokenizer also accepts a raw SentencePiece ".model" file, e.g. a LLaMA tokenizer.model
// (pion import-hf); such a model keeps its own normaliser and special pieces (LLaMA's <s>, </s>
// are control pieces: never produced by encode, dropped by decode).
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace pion {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  virtual std::string kind() const = 0;  // "char", "byte" or "bpe"
  virtual int vocab_size() const = 0;
  // `text` must be valid UTF-8 (checked: invalid input throws pion::Error).
  virtual std::vector<std::int32_t> encode(std::string_view text) const = 0;
  // Ids outside [0, vocab_size) throw pion::Error.
  virtual std::string decode(std::span<const std::int32_t> ids) const = 0;
  // Writes the tokenizer file atomically.
  void save(const std::string& path) const;
  // The JSON text save() writes.
  virtual std::string to_json() const = 0;
  // bpe: the serialized SentencePiece ModelProto (a tokenizer.model file's bytes); "" for
  // char and byte.
  virtual std::string sentencepiece_model() const { return ""; }
  // The SentencePiece model's beginning/end-of-sequence control pieces, -1 when it has none
  // (char, byte and pion-trained bpe never do). encode() never emits them: pion adds no BOS or
  // EOS to any text (see README, "Finetune an existing model").
  virtual int bos_id() const { return -1; }
  virtual int eos_id() const { return -1; }
};

// True when this build can train and load bpe tokenizers.
bool have_sentencepiece();

// kind: "char" | "byte" | "bpe". vocab_size is used by bpe only. work_dir is accepted for
// callers that pass a scratch directory but is unused: SentencePiece trains from the text in
// memory (a SentenceIterator over its lines) and returns the model as bytes, so no temporary
// files are written; save() writes the model. Errors: unknown kind, empty or invalid UTF-8 text,
// bpe without SentencePiece, a bpe vocab_size too small for the text's characters.
std::unique_ptr<Tokenizer> train_tokenizer(const std::string& kind, std::string_view text,
                                           int vocab_size = 0, const std::string& work_dir = "");

// Loads a file written by Tokenizer::save, or a SentencePiece ".model" file.
std::unique_ptr<Tokenizer> load_tokenizer(const std::string& path);
// Parses the JSON text save() writes; `source` names it in error messages.
std::unique_ptr<Tokenizer> tokenizer_from_json(std::string_view json_text,
                                               const std::string& source);

// Each kind directly (train_tokenizer and load_tokenizer dispatch to these).
// char: `vocab` is the id -> code point table; it must be sorted and free of duplicates.
std::unique_ptr<Tokenizer> make_char_tokenizer(std::vector<char32_t> vocab);
// char: the sorted distinct code points of `text` (valid, non-empty UTF-8).
std::unique_ptr<Tokenizer> train_char_tokenizer(std::string_view text);
std::unique_ptr<Tokenizer> make_byte_tokenizer();
// bpe: a serialized SentencePiece ModelProto (the bytes of a .model file).
std::unique_ptr<Tokenizer> make_bpe_tokenizer(const std::string& model_bytes,
                                              const std::string& source);
std::unique_ptr<Tokenizer> train_bpe_tokenizer(std::string_view text, int vocab_size,
                                               const std::string& work_dir);

// The kinds train_tokenizer accepts, for help texts and config validation.
const std::vector<std::string>& tokenizer_kinds();

}  // namespace pion
