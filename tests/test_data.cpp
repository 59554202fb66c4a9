// The data pipeline: tokenizers, llm.c shards, dataset preparation, the pretraining loader,
// the finetuning batcher, the arithmetic task and the built-in corpus.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>

#include "expect_error.h"
#include "helpers.h"
#include "pion/core/error.h"
#include "pion/core/random.h"
#include "pion/data/arithmetic.h"
#include "pion/data/corpus.h"
#include "pion/data/finetune.h"
#include "pion/data/loader.h"
#include "pion/data/prepare.h"
#include "pion/data/shard.h"
#include "pion/data/text_io.h"
#include "pion/data/tokenizer.h"

namespace pion {
namespace {

namespace fs = std::filesystem;
using test::expect_error;

// tinyshakespeare lives beside the checkout (never copied into it); a clone without
// ../shared skips the tests that need it.
std::string shakespeare_path() {
  const std::string p = test::shared_data_path("tinyshakespeare.txt");
  return fs::exists(p) ? p : "";
}

#define REQUIRE_SHAKESPEARE(var)                                                   \
  const std::string var = shakespeare_path();                                      \
  if (var.empty())                                                                 \
    GTEST_SKIP() << "tinyshakespeare.txt not found beside the checkout (expected " \
                 << test::shared_data_path("tinyshakespeare.txt") << ")";

// The first `bytes` bytes of tinyshakespeare (ASCII, so any cut is valid UTF-8).
std::string shakespeare_prefix(const std::string& path, std::size_t bytes) {
  return read_text_file(path).substr(0, bytes);
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary) << bytes;
}

// A random string over a mix of ASCII, Latin-1, CJK and emoji characters; with_lower_block
// adds U+2581 (the character SentencePiece uses for a space, so bpe cannot round-trip it).
std::string random_unicode_text(std::uint64_t seed, int n, bool with_lower_block = true) {
  std::vector<char32_t> alphabet = {U'a', U'Z',      U' ',      U'\n',     U'\t',         U'7',
                                    U'%', U'\u00e9', U'\u00fc', U'\u4e2d', U'\U0001F600', U'.'};
  if (with_lower_block) alphabet.push_back(U'\u2581');
  Rng rng(seed);
  std::string s;
  for (int i = 0; i < n; ++i) append_utf8(s, alphabet[rng.below(alphabet.size())]);
  return s;
}

std::vector<std::uint16_t> random_tokens(std::uint64_t seed, std::size_t n,
                                         std::uint64_t vocab = 65536) {
  Rng rng(seed);
  std::vector<std::uint16_t> t(n);
  for (auto& x : t) x = static_cast<std::uint16_t>(rng.below(vocab));
  return t;
}

// ---------------------------------------------------------------- UTF-8 and text files

TEST(TextIo, InvalidUtf8NamesOffsetAndLine) {
  const std::string good = "line one\nline two caf\xC3\xA9\n";
  EXPECT_NO_THROW(validate_utf8(good, "x"));
  // A lone continuation byte, an overlong '/', a surrogate, a truncated 3-byte sequence, >
  // U+10FFFF.
  for (const std::string& bad :
       {std::string("\x80"), std::string("\xC0\xAF"), std::string("\xED\xA0\x80"),
        std::string("\xE4\xB8"), std::string("\xF4\x90\x80\x80")}) {
    const std::string text = good + "ab" + bad + "cd";
    expect_error([&] { validate_utf8(text, "file 'f.txt'"); },
                 {"file 'f.txt'", "not valid UTF-8",
                  "byte offset " + std::to_string(good.size() + 2), "line 3"});
  }
}

TEST(TextIo, ReadTextFileErrors) {
  const std::string dir = test::temp_dir("data_text");
  expect_error([&] { read_text_file(dir + "/missing.txt"); }, {"missing.txt", "does not exist"});
  write_bytes(dir + "/empty.txt", "");
  expect_error([&] { read_text_file(dir + "/empty.txt"); }, {"empty.txt", "empty"});
  write_bytes(dir + "/latin1.txt", "caf\xE9 au lait");
  expect_error([&] { read_text_file(dir + "/latin1.txt"); },
               {"latin1.txt", "byte offset 3", "0xE9"});
  const std::string text = random_unicode_text(3, 500);
  write_bytes(dir + "/ok.txt", text);
  EXPECT_EQ(read_text_file(dir + "/ok.txt"), text);
}

TEST(TextIo, CodePointsRoundTripAndBase64) {
  const std::string text = random_unicode_text(11, 2000);
  const auto points = utf8_code_points(text);
  EXPECT_EQ(points.size(), utf8_length(text));
  std::string back;
  for (char32_t cp : points) append_utf8(back, cp);
  EXPECT_EQ(back, text);
  EXPECT_EQ(text.substr(utf8_offset_of_code_point(text, 700)), [&] {
    std::string s;
    for (std::size_t i = 700; i < points.size(); ++i) append_utf8(s, points[i]);
    return s;
  }());
  Rng rng(5);
  for (int len = 0; len < 40; ++len) {
    std::string bytes(static_cast<std::size_t>(len), '\0');
    for (auto& c : bytes) c = static_cast<char>(rng.below(256));
    EXPECT_EQ(base64_decode(base64_encode(bytes), "b64"), bytes);
  }
  EXPECT_EQ(base64_encode("Man"), "TWFu");
  EXPECT_EQ(base64_encode("Ma"), "TWE=");
  expect_error([] { base64_decode("TW!u", "model"); }, {"model", "invalid base64"});
}

// ---------------------------------------------------------------- tokenizers

TEST(CharTokenizer, FullShakespeareHas65CharactersAndRoundTrips) {
  REQUIRE_SHAKESPEARE(path);
  const std::string text = read_text_file(path);
  const auto tok = train_tokenizer("char", text);
  EXPECT_EQ(tok->kind(), "char");
  EXPECT_EQ(tok->vocab_size(), 65);  // nanoGPT's shakespeare_char vocabulary
  const auto ids = tok->encode(text);
  EXPECT_EQ(ids.size(), text.size());  // ASCII: one id per byte
  EXPECT_EQ(tok->decode(ids), text);
  // Ids are ranks in the sorted character set: '\n' (the smallest) is 0, 'z' the largest.
  EXPECT_EQ(tok->encode("\n")[0], 0);
  EXPECT_EQ(tok->encode("z")[0], 64);
}

TEST(CharTokenizer, UnicodeRoundTripSaveLoadAndUnknownCharacter) {
  const std::string text = random_unicode_text(7, 3000);
  const auto tok = train_tokenizer("char", text);
  EXPECT_EQ(tok->vocab_size(), 13);  // code points, not bytes
  const auto ids = tok->encode(text);
  EXPECT_EQ(ids.size(), utf8_length(text));
  EXPECT_EQ(tok->decode(ids), text);

  const std::string dir = test::temp_dir("data_char");
  tok->save(dir + "/tok.json");
  const auto loaded = load_tokenizer(dir + "/tok.json");
  EXPECT_EQ(loaded->kind(), "char");
  EXPECT_EQ(loaded->vocab_size(), tok->vocab_size());
  EXPECT_EQ(loaded->encode(text), ids);

  expect_error([&] { tok->encode("aZ\xC3\xA9Q"); },
               {"U+0051 'Q'", "byte offset 4", "not in the char"});
  expect_error([&] { tok->decode(std::vector<std::int32_t>{1, 13}); }, {"id 13", "position 1"});
  expect_error([&] { tok->encode("a\xFF"); }, {"not valid UTF-8", "byte offset 1"});
  expect_error([&] { train_tokenizer("char", ""); }, {"empty"});
}

TEST(ByteTokenizer, RoundTripAndSaveLoad) {
  const std::string text = random_unicode_text(8, 3000);
  const auto tok = train_tokenizer("byte", text);
  EXPECT_EQ(tok->vocab_size(), 256);
  const auto ids = tok->encode(text);
  ASSERT_EQ(ids.size(), text.size());
  for (std::size_t i = 0; i < ids.size(); ++i)
    ASSERT_EQ(ids[i], static_cast<unsigned char>(text[i]));
  EXPECT_EQ(tok->decode(ids), text);
  const std::string dir = test::temp_dir("data_byte");
  tok->save(dir + "/tok.json");
  EXPECT_EQ(load_tokenizer(dir + "/tok.json")->encode(text), ids);
  expect_error([&] { tok->decode(std::vector<std::int32_t>{65, 256}); }, {"id 256"});
}

TEST(BpeTokenizer, TrainRoundTripDeterminismAndSaveLoad) {
  if (!have_sentencepiece())
    GTEST_SKIP() << "built without SentencePiece (install libsentencepiece-dev)";
  REQUIRE_SHAKESPEARE(path);
  const std::string all = read_text_file(path);
  const std::string train = all.substr(0, 200'000);
  const std::string held_out = all.substr(600'000, 50'000);
  const auto tok = train_tokenizer("bpe", train, 400);
  EXPECT_EQ(tok->kind(), "bpe");
  EXPECT_EQ(tok->vocab_size(), 400);

  // Lossless on unseen text, including characters absent from training (byte fallback) and
  // whitespace SentencePiece normally rewrites (leading, repeated, tabs, blank lines).
  for (const std::string& text :
       {held_out, random_unicode_text(9, 1500, false), std::string("  two  spaces\n\n\tTab \n")}) {
    const auto ids = tok->encode(text);
    EXPECT_EQ(tok->decode(ids), text);
    for (auto id : ids) ASSERT_TRUE(id >= 0 && id < 400);
  }
  // The documented exception: a literal U+2581 decodes as the space SentencePiece stores it as.
  EXPECT_EQ(tok->decode(tok->encode("a\u2581b")), "a b");
  // It compresses: clearly fewer tokens than characters on held-out text.
  const auto held_ids = tok->encode(held_out);
  EXPECT_LT(static_cast<double>(held_ids.size()), 0.75 * static_cast<double>(held_out.size()));

  // Deterministic training, and a saved tokenizer encodes identically.
  const auto again = train_tokenizer("bpe", train, 400);
  EXPECT_EQ(again->to_json(), tok->to_json());
  const std::string dir = test::temp_dir("data_bpe");
  tok->save(dir + "/tok.json");
  const auto loaded = load_tokenizer(dir + "/tok.json");
  EXPECT_EQ(loaded->vocab_size(), 400);
  EXPECT_EQ(loaded->encode(held_out), held_ids);

  expect_error([&] { train_tokenizer("bpe", train, 100); }, {"vocab_size 100", "at least"});
  expect_error([&] { tok->decode(std::vector<std::int32_t>{3, 400}); }, {"id 400"});
}

TEST(Tokenizer, LoadErrors) {
  const std::string dir = test::temp_dir("data_tokload");
  expect_error([&] { load_tokenizer(dir + "/nope.json"); }, {"nope.json", "No such file"});
  write_bytes(dir + "/bad.json", "{not json");
  expect_error([&] { load_tokenizer(dir + "/bad.json"); }, {"bad.json", "not valid JSON"});
  write_bytes(dir + "/other.json", R"({"kind": "char"})");
  expect_error([&] { load_tokenizer(dir + "/other.json"); }, {"not a pion tokenizer"});
  write_bytes(dir + "/kind.json", R"({"format": "pion-tokenizer", "version": 1, "kind": "word"})");
  expect_error([&] { load_tokenizer(dir + "/kind.json"); }, {"unknown tokenizer kind 'word'"});
  write_bytes(dir + "/dup.json",
              R"({"format": "pion-tokenizer", "version": 1, "kind": "char", "vocab": ["b", "a"]})");
  expect_error([&] { load_tokenizer(dir + "/dup.json"); }, {"sorted"});
  expect_error([] { train_tokenizer("wordpiece", "abc"); },
               {"unknown tokenizer kind", "char, byte, bpe"});
  if (have_sentencepiece()) {
    write_bytes(dir + "/junk.model", "definitely not a protobuf");
    expect_error([&] { load_tokenizer(dir + "/junk.model"); },
                 {"junk.model", "not a valid SentencePiece model"});
  }
}

// ---------------------------------------------------------------- shards

TEST(Shard, RoundTripAndHeaderLayout) {
  const std::string dir = test::temp_dir("data_shard");
  const auto tokens = random_tokens(21, 12345);
  write_shard(dir + "/a.bin", tokens);
  EXPECT_FALSE(fs::exists(dir + "/a.bin.tmp"));
  EXPECT_EQ(read_shard(dir + "/a.bin"), tokens);
  const std::string bytes = read_file_bytes(dir + "/a.bin");
  ASSERT_EQ(bytes.size(), 1024 + 2 * tokens.size());
  std::int32_t header[3];
  std::memcpy(header, bytes.data(), sizeof header);
  EXPECT_EQ(header[0], 20240520);
  EXPECT_EQ(header[1], 1);
  EXPECT_EQ(header[2], 12345);
  write_shard(dir + "/empty.bin", {});
  EXPECT_TRUE(read_shard(dir + "/empty.bin").empty());
}

TEST(Shard, CorruptShardsAreRejected) {
  const std::string dir = test::temp_dir("data_shard_bad");
  write_shard(dir + "/good.bin", random_tokens(22, 1000));
  const std::string good = read_file_bytes(dir + "/good.bin");

  std::string bad_magic = good;
  bad_magic[0] ^= 0x5A;
  write_bytes(dir + "/magic.bin", bad_magic);
  expect_error([&] { read_shard(dir + "/magic.bin"); }, {"magic.bin", "magic", "20240520"});

  std::string bad_version = good;
  bad_version[4] = 2;
  write_bytes(dir + "/version.bin", bad_version);
  expect_error([&] { read_shard(dir + "/version.bin"); }, {"version 2"});

  write_bytes(dir + "/truncated.bin", good.substr(0, good.size() - 3));
  expect_error([&] { read_shard(dir + "/truncated.bin"); },
               {"truncated.bin", "truncated", "1000 tokens"});
  write_bytes(dir + "/trailing.bin", good + "xy");
  expect_error([&] { read_shard(dir + "/trailing.bin"); }, {"trailing bytes"});
  write_bytes(dir + "/short.bin", good.substr(0, 100));
  expect_error([&] { read_shard(dir + "/short.bin"); }, {"shorter than the 1024-byte"});
  expect_error([&] { read_shard(dir + "/missing.bin"); }, {"does not exist"});

  const std::vector<std::int32_t> ids = {5, 65535, 65536};
  expect_error([&] { to_uint16_tokens(ids); }, {"65536", "position 2"});
}

// ---------------------------------------------------------------- prepare_dataset

TEST(PrepareDataset, CharSplitSizesAndContents) {
  const std::string dir = test::temp_dir("data_prep");
  const std::string text = random_unicode_text(31, 10001);
  write_bytes(dir + "/in.txt", text);
  const auto s = prepare_dataset(dir + "/in.txt", "char", 0, dir + "/ds", 0.1);
  EXPECT_EQ(s.train_chars, 9000);  // floor(10001 * 0.9), split by characters
  EXPECT_EQ(s.val_chars, 1001);
  EXPECT_EQ(s.train_tokens, 9000);
  EXPECT_EQ(s.val_tokens, 1001);
  EXPECT_EQ(s.vocab_size, 13);

  const auto tok = load_tokenizer(s.tokenizer_path);
  const auto train = read_shard(s.train_path);
  const auto val = read_shard(s.val_path);
  const auto decode = [&](const std::vector<std::uint16_t>& t) {
    return tok->decode(std::vector<std::int32_t>(t.begin(), t.end()));
  };
  const std::size_t split = utf8_offset_of_code_point(text, 9000);
  EXPECT_EQ(decode(train), text.substr(0, split));
  EXPECT_EQ(decode(val), text.substr(split));

  ASSERT_TRUE(is_prepared_dataset(dir + "/ds"));
  const auto loaded = load_dataset_summary(dir + "/ds");
  EXPECT_EQ(loaded.train_tokens, s.train_tokens);
  EXPECT_EQ(loaded.val_tokens, s.val_tokens);
  EXPECT_EQ(loaded.tokenizer_kind, "char");
  EXPECT_EQ(loaded.source, dir + "/in.txt");

  expect_error([&] { prepare_dataset(dir + "/in.txt", "char", 0, dir + "/x", 1.0); },
               {"val_fraction"});
  expect_error([&] { prepare_dataset(dir + "/in.txt", "char", 0, dir + "/x", 0.0); },
               {"val_fraction"});
  write_bytes(dir + "/one.txt", "a");
  expect_error([&] { prepare_dataset(dir + "/one.txt", "char", 0, dir + "/x"); }, {"too few"});
  expect_error([&] { prepare_dataset(dir + "/absent.txt", "byte", 0, dir + "/x"); },
               {"absent.txt", "does not exist"});
  expect_error([&] { load_dataset_summary(dir + "/x"); }, {"not a prepared dataset"});
}

// An independent reader and encoder: NumPy reads the shards the way llm.c's Python tools do,
// and nanoGPT's shakespeare_char recipe (sorted character set, first 90% to train) encodes.
TEST(PrepareDataset, MatchesNanoGptCharRecipeReadByNumPy) {
  REQUIRE_SHAKESPEARE(path);
  if (!test::python_has("numpy")) GTEST_SKIP() << "/usr/bin/python3 has no numpy";
  const std::string dir = test::temp_dir("data_prep_np");
  write_bytes(dir + "/in.txt", shakespeare_prefix(path, 100'003));
  prepare_dataset(dir + "/in.txt", "char", 0, dir + "/ds");
  const std::string script = R"(
import sys, numpy as np
d = sys.argv[1]
text = open(d + '/in.txt', encoding='utf-8').read()
chars = sorted(set(text)); stoi = {c: i for i, c in enumerate(chars)}
n = len(text); parts = {'train': text[:int(n * 0.9)], 'val': text[int(n * 0.9):]}
for name, part in parts.items():
    raw = open(d + '/ds/' + name + '.bin', 'rb').read()
    header = np.frombuffer(raw[:1024], dtype='<i4')
    assert header[0] == 20240520 and header[1] == 1 and header[2] == len(part), header[:3]
    tokens = np.frombuffer(raw[1024:], dtype='<u2')
    assert tokens.tolist() == [stoi[c] for c in part], name
print('ok', len(chars))
)";
  write_bytes(dir + "/check.py", script);
  const auto r = test::run_command(test::python() + " " + dir + "/check.py " + dir);
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("ok"), std::string::npos) << r.output;
}

TEST(PrepareDataset, BpeIsTrainedOnTheTrainingPart) {
  if (!have_sentencepiece()) GTEST_SKIP() << "built without SentencePiece";
  REQUIRE_SHAKESPEARE(path);
  const std::string dir = test::temp_dir("data_prep_bpe");
  const std::string text = shakespeare_prefix(path, 120'000);
  write_bytes(dir + "/in.txt", text);
  const auto s = prepare_dataset(dir + "/in.txt", "bpe", 360, dir + "/ds", 0.2);
  EXPECT_EQ(s.train_chars, 96'000);
  EXPECT_EQ(s.vocab_size, 360);
  const auto tok = load_tokenizer(s.tokenizer_path);
  // The saved tokenizer is the one trained on the first 80% of the text.
  EXPECT_EQ(tok->to_json(),
            train_tokenizer("bpe", std::string_view(text).substr(0, 96'000), 360)->to_json());
  const auto val = read_shard(s.val_path);
  EXPECT_EQ(static_cast<std::int64_t>(val.size()), s.val_tokens);
  EXPECT_EQ(tok->decode(std::vector<std::int32_t>(val.begin(), val.end())), text.substr(96'000));
  EXPECT_LT(s.train_tokens, s.train_chars);
}

// ---------------------------------------------------------------- DataLoader

// The start of the window `row` of a batch in `tokens`, checking inputs and targets are that
// window and the one shifted by one; -1 when the row is no window of the stream.
std::int64_t window_start(const std::vector<std::uint16_t>& tokens, const Batch& b,
                          std::int64_t row) {
  const auto t = static_cast<std::size_t>(b.seq_len);
  for (std::size_t s = 0; s + t < tokens.size(); ++s) {
    bool match = true;
    for (std::size_t i = 0; i < t && match; ++i)
      match = b.inputs[row * t + i] == tokens[s + i] && b.targets[row * t + i] == tokens[s + i + 1];
    if (match) return static_cast<std::int64_t>(s);
  }
  return -1;
}

TEST(DataLoader, TargetsAreInputsShiftedByOne) {
  const auto tokens = random_tokens(41, 3000, 500);
  DataLoader loader(tokens, {.batch_size = 6, .seq_len = 17, .seed = 9});
  for (int step = 0; step < 5; ++step) {
    const Batch b = loader.next_batch();
    ASSERT_EQ(b.rows, 6);
    ASSERT_EQ(b.seq_len, 17);
    ASSERT_EQ(b.inputs.size(), 6u * 17u);
    for (std::int64_t r = 0; r < b.rows; ++r) {
      for (std::int64_t i = 0; i + 1 < b.seq_len; ++i)
        ASSERT_EQ(b.targets[r * 17 + i], b.inputs[r * 17 + i + 1]);
      ASSERT_GE(window_start(tokens, b, r), 0) << "row " << r << " is not a window of the stream";
    }
  }
}

TEST(DataLoader, SeededDeterminismAndCoverage) {
  const auto tokens = random_tokens(42, 2000);
  const LoaderOptions opt{.batch_size = 4, .seq_len = 8, .seed = 123};
  DataLoader a(tokens, opt), b(tokens, opt);
  LoaderOptions other = opt;
  other.seed = 124;
  DataLoader c(tokens, other);
  bool any_difference = false;
  std::set<std::int64_t> starts;
  for (int step = 0; step < 50; ++step) {
    const Batch x = a.next_batch(), y = b.next_batch(), z = c.next_batch();
    ASSERT_EQ(x.inputs, y.inputs);
    ASSERT_EQ(x.targets, y.targets);
    any_difference |= x.inputs != z.inputs;
    for (std::int64_t r = 0; r < x.rows; ++r) starts.insert(window_start(tokens, x, r));
  }
  EXPECT_TRUE(any_difference);
  EXPECT_GT(starts.size(), 150u);  // 200 draws from 1992 starts: almost all distinct
  EXPECT_FALSE(starts.contains(-1));
}

TEST(DataLoader, StateSaveRestoreContinuesIdentically) {
  const auto tokens = random_tokens(43, 5000);
  const LoaderOptions opt{.batch_size = 3, .seq_len = 12, .seed = 77};
  DataLoader a(tokens, opt);
  for (int i = 0; i < 7; ++i) a.next_batch();
  const std::string state = a.state();
  std::vector<Batch> expected;
  for (int i = 0; i < 5; ++i) expected.push_back(a.next_batch());

  DataLoader resumed(tokens,
                     {.batch_size = 3, .seq_len = 12, .seed = 1});  // the seed is overridden
  resumed.set_state(state);
  EXPECT_EQ(resumed.batches_drawn(), 7);
  for (int i = 0; i < 5; ++i) {
    const Batch b = resumed.next_batch();
    ASSERT_EQ(b.inputs, expected[static_cast<std::size_t>(i)].inputs);
    ASSERT_EQ(b.targets, expected[static_cast<std::size_t>(i)].targets);
  }
  DataLoader other_data(random_tokens(44, 4000), opt);
  expect_error([&] { other_data.set_state(state); }, {"5000 tokens", "4000"});
  expect_error([&] { other_data.set_state("{\"rng\": [1, 2]}"); }, {"malformed"});
}

TEST(DataLoader, RankSlicesEqualTheGlobalBatch) {
  const auto tokens = random_tokens(45, 4000);
  for (int world : {2, 4}) {
    DataLoader global(tokens, {.batch_size = 8, .seq_len = 10, .seed = 5});
    std::vector<DataLoader> ranks;
    for (int r = 0; r < world; ++r)
      ranks.emplace_back(
          tokens,
          LoaderOptions{.batch_size = 8, .seq_len = 10, .rank = r, .world_size = world, .seed = 5});
    for (int step = 0; step < 4; ++step) {
      const Batch g = global.next_batch();
      std::vector<std::int32_t> inputs, targets;
      for (auto& rank : ranks) {
        const Batch b = rank.next_batch();
        ASSERT_EQ(b.rows, 8 / world);
        inputs.insert(inputs.end(), b.inputs.begin(), b.inputs.end());
        targets.insert(targets.end(), b.targets.begin(), b.targets.end());
      }
      ASSERT_EQ(inputs, g.inputs) << "world " << world << " step " << step;
      ASSERT_EQ(targets, g.targets);
    }
  }
  expect_error(
      [&] { DataLoader(tokens, {.batch_size = 6, .seq_len = 10, .rank = 0, .world_size = 4}); },
      {"divisible by world_size 4"});
  expect_error(
      [&] { DataLoader(tokens, {.batch_size = 8, .seq_len = 10, .rank = 2, .world_size = 2}); },
      {"rank 2"});
}

TEST(DataLoader, EvalBatchesAreFixedNonOverlappingWindows) {
  const auto tokens = random_tokens(46, 1001);
  DataLoader loader(tokens, {.batch_size = 4, .seq_len = 10, .seed = 3});
  EXPECT_EQ(loader.eval_batches_per_pass(), 25);  // 100 windows / 4
  const Batch first = loader.eval_batch(2);
  for (int i = 0; i < 3; ++i) loader.next_batch();  // training draws do not move eval windows
  const Batch again = loader.eval_batch(2);
  EXPECT_EQ(first.inputs, again.inputs);
  for (std::int64_t r = 0; r < 4; ++r) EXPECT_EQ(window_start(tokens, first, r), (8 + r) * 10);
  // Every window of one pass, in order, covers tokens[0, 1000) once.
  std::vector<std::int32_t> all;
  for (std::int64_t k = 0; k < loader.eval_batches_per_pass(); ++k) {
    const Batch b = loader.eval_batch(k);
    all.insert(all.end(), b.inputs.begin(), b.inputs.end());
  }
  EXPECT_TRUE(std::equal(all.begin(), all.end(), tokens.begin()));
  // Rank slices of eval batches also tile the global eval batch.
  DataLoader r1(tokens, {.batch_size = 4, .seq_len = 10, .rank = 1, .world_size = 2});
  const Batch b1 = r1.eval_batch(2);
  EXPECT_TRUE(std::equal(b1.inputs.begin(), b1.inputs.end(), first.inputs.begin() + 20));
}

TEST(DataLoader, FromShardAndShortStreams) {
  const std::string dir = test::temp_dir("data_loader");
  const auto tokens = random_tokens(47, 300);
  write_shard(dir + "/t.bin", tokens);
  DataLoader loader =
      DataLoader::from_shard(dir + "/t.bin", {.batch_size = 2, .seq_len = 20, .seed = 8});
  EXPECT_EQ(loader.num_tokens(), 300);
  const Batch b = loader.next_batch();
  EXPECT_GE(window_start(tokens, b, 1), 0);
  expect_error([&] { DataLoader::from_shard(dir + "/t.bin", {.batch_size = 2, .seq_len = 300}); },
               {"t.bin", "300 tokens", "seq_len + 1 = 301"});
}

// ---------------------------------------------------------------- finetuning

TEST(Finetune, JsonlLoadErrorsNameTheLine) {
  const std::string dir = test::temp_dir("data_ft");
  const auto examples = arithmetic_examples(5, 2, 1, 3);
  write_finetune_jsonl(dir + "/ok.jsonl", examples);
  EXPECT_EQ(load_finetune_jsonl(dir + "/ok.jsonl"), examples);

  const std::string good = R"({"prompt": "1+2=", "response": "3"})";
  const std::map<std::string, std::vector<std::string>> cases = {
      {good + "\n\n{\"prompt\": \"1+\n", {"line 3", "not valid JSON"}},
      {good + "\n[1, 2]\n", {"line 2", "not a JSON object"}},
      {good + "\n" + good + "\n{\"prompt\": \"x\"}\n", {"line 3", "no \"response\" key"}},
      {"{\"prompt\": 5, \"response\": \"x\"}\n", {"line 1", "\"prompt\" must be a string"}},
      {"{\"prompt\": \"\", \"response\": \"x\"}\n", {"line 1", "empty \"prompt\""}},
      {"\n  \n", {"holds no examples"}},
      {good + "\r\n{\"prompt\": \"caf\xE9=\", \"response\": \"x\"}\n", {"line 2", "not valid JSON"}},
  };
  int i = 0;
  for (const auto& [content, parts] : cases) {
    const std::string path = dir + "/bad" + std::to_string(i++) + ".jsonl";
    write_bytes(path, content);
    try {
      load_finetune_jsonl(path);
      ADD_FAILURE() << "no error for " << content;
    } catch (const Error& e) {
      for (const auto& p : parts)
        EXPECT_NE(std::string(e.what()).find(p), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
    }
  }
  expect_error([&] { load_finetune_jsonl(dir + "/none.jsonl"); }, {"none.jsonl", "No such file"});
}

TEST(Finetune, TargetsAreMaskedOnPromptAndPadding) {
  const auto examples = arithmetic_examples(40, 17, 1, 8);
  const auto tok = train_tokenizer("char", finetune_text(examples));
  FinetuneDataset data(examples, *tok);
  const std::int64_t t = 20;  // up to 8+8+2 prompt + 9+1 completion = 28 > 21: some are truncated
  std::vector<std::size_t> indices(examples.size());
  for (std::size_t i = 0; i < indices.size(); ++i) indices[i] = i;
  const Batch b = data.make_batch(indices, t);
  ASSERT_EQ(b.rows, 40);
  std::int64_t truncated = 0;
  for (std::size_t r = 0; r < examples.size(); ++r) {
    const auto& ex = data.example(r);
    const std::size_t p = ex.prompt.size(), c = ex.completion.size();
    ASSERT_EQ(p, examples[r].prompt.size());
    ASSERT_EQ(c, examples[r].response.size() + 1);
    const std::size_t kept_prompt = std::min(p, static_cast<std::size_t>(t) + 1 - c);
    truncated += kept_prompt < p;
    const std::int32_t* in = &b.inputs[r * t];
    const std::int32_t* tg = &b.targets[r * t];
    std::vector<std::int32_t> answer;
    for (std::int64_t i = 0; i < t; ++i) {
      const auto pos = static_cast<std::size_t>(i);
      const bool on_prompt = pos + 1 < kept_prompt;
      const bool on_padding = pos + 1 >= kept_prompt + c;
      if (on_prompt || on_padding) {
        ASSERT_EQ(tg[i], -1) << "row " << r << " pos " << i;
      } else {
        ASSERT_GE(tg[i], 0) << "row " << r << " pos " << i;
        answer.push_back(tg[i]);
        if (i + 1 < t && tg[i + 1] >= 0) {
          ASSERT_EQ(in[i + 1], tg[i]);  // still shifted by one
        }
      }
      if (pos < kept_prompt) {
        ASSERT_EQ(in[i], ex.prompt[p - kept_prompt + pos]);
      }
    }
    // The targets spell exactly the response followed by the end marker.
    EXPECT_EQ(tok->decode(answer), examples[r].response + "\n");
  }
  EXPECT_EQ(truncated, data.count_truncated(t));
  EXPECT_GT(truncated, 0);
}

TEST(Finetune, LongResponseKeepsOnePromptToken) {
  const std::vector<FinetuneExample> ex = {{"question?", "a very long answer indeed"}};
  const auto tok = train_tokenizer("byte", finetune_text(ex));
  FinetuneDataset data(ex, *tok);
  const std::size_t idx = 0;
  const Batch b = data.make_batch(std::span(&idx, 1), 8);
  EXPECT_EQ(tok->decode(std::vector<std::int32_t>(b.inputs.begin(), b.inputs.end())), "?a very ");
  EXPECT_EQ(tok->decode(std::vector<std::int32_t>(b.targets.begin(), b.targets.end())), "a very l");
}

TEST(Finetune, LoaderDeterminismStateAndRankSlices) {
  const auto examples = arithmetic_examples(30, 4, 1, 4);
  const auto tok = train_tokenizer("char", finetune_text(examples));
  const LoaderOptions opt{.batch_size = 4, .seq_len = 16, .seed = 99};
  FinetuneLoader a(FinetuneDataset(examples, *tok), opt), b(FinetuneDataset(examples, *tok), opt);
  for (int i = 0; i < 3; ++i) ASSERT_EQ(a.next_batch().targets, b.next_batch().targets);
  const std::string state = a.state();
  const Batch next = a.next_batch();
  FinetuneLoader c(FinetuneDataset(examples, *tok), {.batch_size = 4, .seq_len = 16, .seed = 1});
  c.set_state(state);
  EXPECT_EQ(c.next_batch().inputs, next.inputs);

  FinetuneLoader global(FinetuneDataset(examples, *tok), opt);
  FinetuneLoader r0(FinetuneDataset(examples, *tok),
                    {.batch_size = 4, .seq_len = 16, .rank = 0, .world_size = 2, .seed = 99});
  FinetuneLoader r1(FinetuneDataset(examples, *tok),
                    {.batch_size = 4, .seq_len = 16, .rank = 1, .world_size = 2, .seed = 99});
  for (int i = 0; i < 3; ++i) {
    const Batch g = global.next_batch();
    auto x = r0.next_batch().inputs;
    const auto y = r1.next_batch().inputs;
    x.insert(x.end(), y.begin(), y.end());
    ASSERT_EQ(x, g.inputs);
  }
  EXPECT_EQ(global.eval_batches_per_pass(), 8);
  EXPECT_EQ(global.eval_batch(1).inputs, global.eval_batch(1).inputs);
}

TEST(Finetune, ExactMatch) {
  EXPECT_TRUE(exact_match("357\nmore junk", "357"));
  EXPECT_FALSE(exact_match("357", "357"));  // never ended
  EXPECT_FALSE(exact_match(" 357\n", "357"));
  EXPECT_FALSE(exact_match("3570\n", "357"));
  const std::vector<FinetuneExample> ex = {{"1+1=", "2"}, {"2+2=", "4"}};
  const std::vector<std::string> out = {"2\n", "5\n"};
  EXPECT_DOUBLE_EQ(exact_match_rate(out, ex), 0.5);
}

// ---------------------------------------------------------------- arithmetic

TEST(Arithmetic, DeterministicAndCorrect) {
  const std::string dir = test::temp_dir("data_arith");
  generate_arithmetic(dir + "/a.jsonl", 300, 7, 1, 18);
  generate_arithmetic(dir + "/b.jsonl", 300, 7, 1, 18);
  generate_arithmetic(dir + "/c.jsonl", 300, 8, 1, 18);
  EXPECT_EQ(read_file_bytes(dir + "/a.jsonl"), read_file_bytes(dir + "/b.jsonl"));
  EXPECT_NE(read_file_bytes(dir + "/a.jsonl"), read_file_bytes(dir + "/c.jsonl"));

  const auto examples = load_finetune_jsonl(dir + "/a.jsonl");
  ASSERT_EQ(examples.size(), 300u);
  std::set<std::size_t> lengths;
  for (const auto& ex : examples) {
    // Independent check with machine integers (18 digits + 18 digits < 2^64).
    const std::size_t plus = ex.prompt.find('+');
    ASSERT_NE(plus, std::string::npos);
    ASSERT_EQ(ex.prompt.back(), '=');
    const std::string a = ex.prompt.substr(0, plus),
                      b = ex.prompt.substr(plus + 1, ex.prompt.size() - plus - 2);
    for (const auto& s : {a, b}) {
      ASSERT_TRUE(s.size() >= 1 && s.size() <= 18) << ex.prompt;
      ASSERT_TRUE(s.size() == 1 || s[0] != '0') << "leading zero in " << ex.prompt;
      lengths.insert(s.size());
    }
    const std::uint64_t sum = std::stoull(a) + std::stoull(b);
    ASSERT_EQ(ex.response, std::to_string(sum)) << ex.prompt;
    EXPECT_EQ(arithmetic_answer(ex.prompt), ex.response);
    EXPECT_EQ(arithmetic_reward(ex.prompt, ex.response + "\n"), 1.0);
    EXPECT_EQ(arithmetic_reward(ex.prompt, std::to_string(sum + 1) + "\n"), 0.0);
  }
  EXPECT_EQ(lengths.size(), 18u);  // every digit count in [1, 18] occurs
  for (const auto& ex : arithmetic_examples(50, 3, 4, 4)) {
    EXPECT_EQ(ex.prompt.size(), 10u);  // "dddd+dddd="
  }
  EXPECT_EQ(add_decimal("999999999999999999999999", "1"), "1000000000000000000000000");
  expect_error([] { arithmetic_examples(5, 1, 3, 2); }, {"min_digits"});
  expect_error([] { arithmetic_answer("12-3="); }, {"not an addition prompt"});
}

// ---------------------------------------------------------------- default corpus

TEST(DefaultCorpus, SyntheticFortuneDirectory) {
  const std::string dir = test::temp_dir("data_fortunes");
  write_bytes(dir + "/b", "second file\n%\n\n  \n");
  write_bytes(dir + "/a", "one\ntwo\n%\n\nun_\bder _\bx\bx\ablink\n%\n");
  write_bytes(dir + "/a.dat", "binary\xFF");
  write_bytes(dir + "/a.u8", "duplicate");
  fs::create_symlink(dir + "/a", dir + "/link");
  EXPECT_EQ(default_corpus_text(dir), "one\ntwo\n\nunder xblink\n\nsecond file\n\n");
  const std::size_t chars =
      build_default_corpus(dir + "/../corpus_" + std::to_string(::getpid()) + ".txt", dir);
  EXPECT_EQ(chars, std::string("one\ntwo\n\nunder xblink\n\nsecond file\n\n").size());
  fs::remove(dir + "/../corpus_" + std::to_string(::getpid()) + ".txt");

  const std::string empty = test::temp_dir("data_nofortunes");
  expect_error([&] { default_corpus_text(empty + "/games/fortunes"); },
               {"apt-get install fortunes"});
}

TEST(DefaultCorpus, DebianFortunes) {
  if (!fs::exists(std::string(kFortunesDir) + "/fortunes"))
    GTEST_SKIP() << "Debian's fortunes package is not installed (apt-get install fortunes)";
  const std::string text = default_corpus_text();
  EXPECT_NO_THROW(validate_utf8(text, "corpus"));
  const std::size_t chars = utf8_length(text);
  EXPECT_GT(chars, 1'000'000u);
  EXPECT_EQ(text.find("\n%\n"), std::string::npos);
  EXPECT_EQ(text.find('\b'), std::string::npos);
  const auto tok = train_tokenizer("char", text);
  EXPECT_GT(tok->vocab_size(), 90);
  std::printf("default corpus: %zu characters, %zu bytes, %d distinct characters\n", chars,
              text.size(), tok->vocab_size());
}

}  // namespace
}  // namespace pion
