// Untrusted input refused cleanly (issue 16): every case here must end in one pion::Error
// naming the file (and the line or key), never a crash, a hang or a huge allocation.
// The fuzz targets in fuzz/ explore the same readers with random input.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "expect_error.h"
#include "helpers.h"
#include "pion/core/error.h"
#include "pion/core/input.h"
#include "pion/core/safetensors.h"
#include "pion/data/finetune.h"
#include "pion/data/prepare.h"
#include "pion/data/tokenizer.h"
#include "pion/model/config.h"
#include "pion/train/config.h"

namespace pion {
namespace {

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out << bytes;
  ASSERT_TRUE(static_cast<bool>(out)) << path;
}

// test::expect_error, and the message is one line of a readable length.
template <class Fn>
void expect_error(Fn&& fn, const std::vector<std::string>& parts) {
  const std::optional<std::string> what = test::expect_error(fn, parts);
  if (!what) return;
  EXPECT_EQ(what->find('\n'), std::string::npos) << "not one line: " << *what;
  EXPECT_LT(what->size(), 1000u) << "message too long";
}

// ---------------------------------------------------------------- finetuning JSONL

TEST(InputJsonl, NestedTwoHundredThousandLevelsIsAnError) {
  const std::string dir = test::temp_dir("input_deep");
  const std::string good = R"({"prompt": "1+2=", "response": "3"})";
  const std::string deep = std::string(200000, '[') + std::string(200000, ']');
  write_bytes(dir + "/deep.jsonl", good + "\n" + deep + "\n");
  expect_error([&] { load_finetune_jsonl(dir + "/deep.jsonl"); },
               {"line 2", "deep.jsonl", "nested more than"});
  // Unclosed, inside an object, and in memory.
  std::string open = R"({"prompt": "a", "response": "b", "x": )";
  for (int i = 0; i < 100000; ++i) open += R"({"k":[)";  // two levels each
  write_bytes(dir + "/open.jsonl", open + "\n");
  expect_error([&] { load_finetune_jsonl(dir + "/open.jsonl"); },
               {"line 1", "open.jsonl", "nested more than"});
  expect_error([&] { parse_finetune_jsonl(std::string(200000, '['), "mem.jsonl"); },
               {"line 1", "mem.jsonl", "nested more than"});
}

TEST(InputJsonl, DevZeroAndOversizeLinesAreRefused) {
  expect_error([] { load_finetune_jsonl("/dev/zero"); }, {"/dev/zero", "not a regular file"});
  const std::string dir = test::temp_dir("input_long");
  expect_error([&] { load_finetune_jsonl(dir); }, {"is a directory"});
  const std::string long_line = R"({"prompt": "a", "response": ")" +
                                std::string(kMaxFinetuneLineBytes, 'x') + "\"}";
  expect_error([&] { parse_finetune_jsonl("\n" + long_line + "\n", "long.jsonl"); },
               {"line 2", "long.jsonl", "bytes long"});
}

TEST(InputJsonl, MessagesNeverDumpTheValue) {
  // A huge non-string "response" is described by kind and size, not printed.
  std::string big = R"({"prompt": "a", "response": [)";
  for (int i = 0; i < 50000; ++i) big += "1,";
  big += "1]}";
  expect_error([&] { parse_finetune_jsonl(big, "big.jsonl"); },
               {"line 1", "big.jsonl", "\"response\" must be a string", "array of 50001 values"});
  expect_error([] { parse_finetune_jsonl(R"({"prompt": "a", "prompt": "b", "response": "c"})",
                                         "dup.jsonl"); },
               {"line 1", "dup.jsonl", "appears twice"});
}

// ---------------------------------------------------------------- data directory files

// A prepared char dataset in a fresh directory; returns its path.
std::string prepared_dataset(const std::string& tag) {
  const std::string dir = test::temp_dir(tag) + "/ds";
  prepare_dataset_from_text("hello world, hello pion\n", "test text", "char", 0, dir, 0.25);
  return dir;
}

TEST(InputDataDir, GarbageTokenizerJsonIsRefusedNamingFileAndKey) {
  const std::string dir = prepared_dataset("input_tok");
  const std::string path = load_dataset_summary(dir).tokenizer_path;
  ASSERT_NO_THROW(load_tokenizer(path));
  const std::vector<std::pair<std::string, std::vector<std::string>>> cases = {
      {std::string("\x00\x01\xff garbage", 12), {"not valid JSON"}},
      {"[1, 2, 3]", {"not a pion tokenizer", "an array of 3 values"}},
      {R"({"format": "pion-tokenizer", "version": 1.5, "kind": "char"})", {"version 1.5"}},
      {R"({"format": "pion-tokenizer", "version": 1, "kind": 7})", {"key 'kind'", "got 7"}},
      {R"({"format": "pion-tokenizer", "version": 1, "kind": "char"})", {"lacks the key 'vocab'"}},
      {R"({"format": "pion-tokenizer", "version": 1, "kind": "char", "vocab": {"a": 1}})",
       {"key 'vocab'", "an object of 1 keys"}},
      {R"({"format": "pion-tokenizer", "version": 1, "kind": "char", "vocab": ["a", 4294967297]})",
       {"key 'vocab', entry 1", "must be a string", "4294967297"}},
      {R"({"format": "pion-tokenizer", "version": 1, "kind": "char", "vocab": ["a", "bc"]})",
       {"key 'vocab', entry 1", "exactly one character"}},
      {R"({"format": "pion-tokenizer", "version": 1, "kind": "char", "vocab": ["b", "a"]})",
       {"sorted"}},
      {R"({"format": "pion-tokenizer", "version": 1, "kind": "bpe",
           "sentencepiece_model_base64": "!!!"})",
       {"sentencepiece_model_base64"}},
      {R"({"format": "pion-tokenizer", "version": 1, "kind": "char", "kind": "byte"})",
       {"appears twice"}},
      {std::string(100000, '['), {"nested more than"}},
  };
  for (const auto& [content, parts] : cases) {
    SCOPED_TRACE(content.substr(0, 80));
    write_bytes(path, content);
    std::vector<std::string> all = parts;
    all.push_back(path);
    expect_error([&] { load_tokenizer(path); }, all);
  }
  expect_error([] { load_tokenizer("/dev/zero"); }, {"/dev/zero", "not a regular file"});
}

TEST(InputDataDir, GarbageMetaJsonIsRefusedNamingFileAndKey) {
  const std::string dir = prepared_dataset("input_meta");
  const std::string path = dir + "/meta.json";
  const nlohmann::json good = input::read_json_file(path, "meta");
  ASSERT_NO_THROW(load_dataset_summary(dir));
  const auto with = [&](const std::string& key, const nlohmann::json& value) {
    nlohmann::json j = good;
    j[key] = value;
    return j.dump();
  };
  const std::vector<std::pair<std::string, std::vector<std::string>>> cases = {
      {with("vocab_size", 4294967297ULL), {"key 'vocab_size'", "4294967297", "[1, 65536]"}},
      {with("vocab_size", 1.7), {"key 'vocab_size'", "1.7"}},
      {with("vocab_size", "12"), {"key 'vocab_size'", "\"12\""}},
      {with("val_fraction", 1.0), {"key 'val_fraction'", "(0, 1)"}},
      {with("train_tokens", -5), {"key 'train_tokens'", "-5"}},
      {with("train_chars", 1e300), {"key 'train_chars'"}},
      {with("source", nlohmann::json::array({1, 2})), {"key 'source'", "an array of 2 values"}},
      {with("train", "../../etc/passwd"), {"key 'train'", "inside the dataset directory"}},
      {"{\"format\": \"pion-dataset\"", {"not valid JSON"}},
      {"\xff\xfe garbage", {"not valid JSON"}},
      {"{\"format\": \"pion-dataset\", \"version\": 1}", {"lacks the key"}},
      {std::string(100000, '['), {"nested more than"}},
  };
  for (const auto& [content, parts] : cases) {
    SCOPED_TRACE(content.substr(0, 80));
    write_bytes(path, content);
    std::vector<std::string> all = parts;
    all.push_back("meta.json");
    expect_error([&] { load_dataset_summary(dir); }, all);
  }
}

// ---------------------------------------------------------------- describe (fuzz finding)

TEST(InputDescribe, NeverThrowsOnACutCharacterOrBytesThatAreNotUtf8) {
  // fuzz_safetensors found it: a metadata key longer than 40 bytes with a 3-byte character
  // across byte 40; describe() cut inside the character and dump() threw json::type_error
  // out of parse_safetensors (not a pion::Error).
  const std::string key = std::string(39, 'c') + "\u0b0c" + std::string(20, 'd');
  std::string text;
  ASSERT_NO_THROW(text = input::describe(key));
  EXPECT_EQ(text, "\"" + std::string(39, 'c') + "\"... (62 bytes)");
  EXPECT_EQ(input::describe(std::string("a\xff\xfe")), "\"a\xef\xbf\xbd\xef\xbf\xbd\"");
  const std::string long_bad = std::string(50, '\xe0');
  EXPECT_NO_THROW(input::describe(long_bad));

  std::ifstream in(std::string(PION_SOURCE_DIR) +
                       "/fuzz/corpus/safetensors/regress-describe-utf8-cut",
                   std::ios::binary);
  ASSERT_TRUE(static_cast<bool>(in));
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  expect_error([&] { parse_safetensors(bytes, "crash.safetensors"); },
               {"crash.safetensors", "metadata", "(96 bytes)"});
  // fuzz_config found the same through an unknown config key.
  TrainConfig config;
  expect_error([&] { apply_config_json(config, nlohmann::json{{key, 0}}); },
               {"unknown config key", "(62 bytes)"});
}

// ---------------------------------------------------------------- configs (fuzz findings)

TEST(InputConfig, OutOfRangeNumbersAreErrorsNotConversions) {
  // fuzz/corpus/config/model_bad.json: "n_layer": 1e30 was undefined behaviour (a double
  // outside int's range converted to int) in ModelConfig::from_json.
  nlohmann::json model = {{"vocab_size", 65}, {"n_layer", 1e30}, {"n_head", 2},
                          {"d_model", 32},    {"seq_len", 16}};
  expect_error([&] { ModelConfig::from_json(model); }, {"n_layer", "1e+30"});
  model["n_layer"] = 1.7;
  expect_error([&] { ModelConfig::from_json(model); }, {"n_layer", "1.7"});
  model["n_layer"] = 2;
  model["d_model"] = 1 << 30;  // 8 * d_model would overflow int in ffn_size()
  model["n_head"] = 2;
  expect_error([&] { ModelConfig::from_json(model); }, {"d_model", "1073741824"});
  model["d_model"] = 32;
  EXPECT_NO_THROW(ModelConfig::from_json(model));
  model["init"] = 5;
  expect_error([&] { ModelConfig::from_json(model); }, {"'init'", "must be a string"});

  TrainConfig config;
  for (const auto& [key, value] : std::vector<std::pair<std::string, nlohmann::json>>{
           {"n_layer", 1e30}, {"n_layer", 4294967297LL}, {"n_layer", 1.7}, {"seed", -1},
           {"seed", 1e30}, {"lr", "x"}, {"data", nlohmann::json::array()}}) {
    SCOPED_TRACE(key + " = " + value.dump());
    expect_error([&] { set_config_value(config, key, value); }, {"config key '" + key + "'"});
  }
  set_config_value(config, "n_layer", 1e3);  // an integer written as a float is fine
  EXPECT_EQ(config.n_layer, 1000);
  expect_error([&] { input::parse_json(R"({"lr": 1e999})", "c.json"); }, {"c.json", "1e999"});
  expect_error([&] { set_config_value(config, "lr", std::numeric_limits<double>::infinity()); },
               {"config key 'lr'", "finite"});
}

}  // namespace
}  // namespace pion
