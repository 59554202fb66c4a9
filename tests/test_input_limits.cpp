// Every input a promise (issue 16): the validation layer (pion/core/input.h) read directly, the
// config keys' types and bounds, the memory guard, and through the `pion` binary: each class of
// bad input is one "pion: error:" line naming the key or file, with exit code 2.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <string>

#include "expect_error.h"
#include "helpers.h"
#include "pion/core/error.h"
#include "pion/core/input.h"
#include "pion/core/safetensors.h"
#include "pion/data/text_io.h"
#include "pion/core/random.h"
#include "pion/model/config.h"
#include "pion/model/llama.h"
#include "pion/model/memory.h"
#include "pion/train/build_optimizer.h"
#include "pion/train/config.h"

using namespace pion;
using nlohmann::json;
using test::expect_cli_error;
using test::expect_error;

namespace {

std::string deep_json(int levels) {
  return std::string(levels, '[') + std::string(levels, ']');
}

std::string write(const std::string& path, const std::string& text) {
  std::ofstream(path, std::ios::binary) << text;
  return path;
}

}  // namespace

// ---- the validation layer --------------------------------------------------------------------

TEST(Input, ToIntReadsIntegersAtTheirRangeOnly) {
  EXPECT_EQ(input::to_int(json(42), 0, 100, "k"), 42);
  EXPECT_EQ(input::to_int(json(1e3), 0, 10000, "k"), 1000);  // an integer written as a float
  EXPECT_EQ(input::to_int32(json(-5), -10, 10, "k"), -5);
  expect_error([] { input::to_int32(json(4294967297ULL), 0, 1 << 30, "key 'n'"); },
               {"key 'n'", "4294967297", "[0, 1073741824]"});
  expect_error([] { input::to_int(json(1.7), 0, 10, "key 'n'"); }, {"key 'n'", "1.7", "integer"});
  expect_error([] { input::to_int(json(101), 0, 100, "k"); }, {"101", "[0, 100]"});
  expect_error([] { input::to_int(json(-1), 0, 100, "k"); }, {"-1"});
  expect_error([] { input::to_int(json("5"), 0, 100, "k"); }, {"\"5\""});
  expect_error([] { input::to_int(json(true), 0, 100, "k"); }, {"true"});
  expect_error(
      [] {
        input::to_int(json(std::numeric_limits<std::uint64_t>::max()), 0,
                      std::numeric_limits<std::int64_t>::max(), "k");
      },
      {"18446744073709551615"});
  expect_error([] { input::to_int(json(std::nan("")), 0, 100, "k"); }, {"k"});
  expect_error([] { input::to_int(json(1e300), 0, 100, "k"); }, {"k"});
  // Containers are described, never dumped.
  expect_error([] { input::to_int(json::array({1, 2, 3}), 0, 100, "k"); }, {"an array of 3"});
}

TEST(Input, ToDoubleWantsAFiniteNumberInRange) {
  EXPECT_DOUBLE_EQ(input::to_double(json(0.5), 0, 1, "k"), 0.5);
  EXPECT_DOUBLE_EQ(input::to_double(json(1), 0, 1, "k"), 1.0);
  expect_error([] { input::to_double(json(1), 0, 1, "key 'x'", false, true); },
               {"key 'x'", "[0, 1)"});
  expect_error([] { input::to_double(json(0), 0, 1, "k", true); }, {"(0, 1]"});
  expect_error([] { input::to_double(json(std::nan("")), 0, 1, "k"); }, {"finite"});
  expect_error(
      [] { input::to_double(json(std::numeric_limits<double>::infinity()), 0, 1e300, "k"); },
      {"finite"});
  expect_error([] { input::to_double(json("0.5"), 0, 1, "k"); }, {"\"0.5\""});
  const std::string long_text(1000, 'x');
  try {
    input::to_double(json(long_text), 0, 1, "k");
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_LT(std::string(e.what()).size(), 200u) << "a long value is cut in messages";
  }
}

TEST(Input, ParseJsonLimitsDepthSizeAndDuplicateKeys) {
  EXPECT_EQ(input::parse_json(R"({"a": [1, {"b": 2}]})", "t")["a"][1]["b"], 2);
  EXPECT_NO_THROW(input::parse_json(deep_json(input::kMaxJsonDepth), "t"));
  expect_error([] { input::parse_json(deep_json(input::kMaxJsonDepth + 1), "text 't'"); },
               {"text 't'", "nested"});
  // Deep enough to overflow the stack of a recursive parser or destructor: refused while parsing.
  expect_error([] { input::parse_json(deep_json(200000), "deep"); }, {"deep", "nested"});
  expect_error([] { input::parse_json(R"({"a": 1, "a": 2})", "dup"); }, {"dup", "\"a\"", "twice"});
  expect_error([] { input::parse_json(R"({"x": {"a": 1, "a": 2}})", "dup"); }, {"twice"});
  EXPECT_NO_THROW(input::parse_json(R"({"x": {"a": 1}, "y": {"a": 2}})", "t"));
  EXPECT_NO_THROW(input::parse_json(R"({"a": 1, "a": 2})", "t", input::kMaxJsonBytes,
                                    input::kMaxJsonDepth, /*unique_keys=*/false));
  expect_error([] { input::parse_json(R"({"a": "0123456789"})", "small", 10); },
               {"small", "limit"});
  expect_error([] { input::parse_json(R"({"a": )", "broken"); }, {"broken", "not valid JSON"});
}

TEST(Input, FilesMustBeRegularAndSmallEnough) {
  const std::string dir = test::temp_dir("input_files");
  expect_error([] { input::read_file("/dev/zero", 1 << 20, "config file"); },
               {"config file '/dev/zero'", "not a regular file"});
  expect_error([&] { input::read_file(dir, 1 << 20, "config file"); }, {"directory"});
  expect_error([&] { input::read_file(dir + "/none", 1 << 20, "config file"); }, {"none"});
  write(dir + "/big.txt", std::string(2000, 'a'));
  expect_error([&] { input::read_file(dir + "/big.txt", 1000, "text file"); },
               {"big.txt", "2000 bytes", "1000 bytes"});
  EXPECT_EQ(input::read_file(dir + "/big.txt", 2000, "text file").size(), 2000u);
  // The data pipeline's readers go through it.
  expect_error([] { read_text_file("/dev/zero"); }, {"/dev/zero", "not a regular file"});
  expect_error([&] { read_text_file(dir); }, {"directory"});
  expect_error([&] { read_file_bytes(dir + "/big.txt", 100, "token shard"); },
               {"token shard", "big.txt"});
  EXPECT_EQ(kMaxTextBytes, std::uint64_t{4} << 30);
}

// ---- config keys -----------------------------------------------------------------------------

TEST(ConfigLimits, IntKeysAreNeverNarrowed) {
  TrainConfig c;
  expect_error([&] { set_config_value(c, "n_layer", json(4294967297LL)); },
               {"config key 'n_layer'", "4294967297", "[1, 1024]"});
  expect_error([&] { set_config_value(c, "n_layer", parse_flag_value("4294967297")); },
               {"n_layer"});
  EXPECT_EQ(c.n_layer, TrainConfig{}.n_layer) << "a refused value leaves the key unchanged";
  expect_error([&] { set_config_value(c, "batch_size", json(1.7)); },
               {"config key 'batch_size'", "1.7"});
  expect_error([&] { set_config_value(c, "batch_size", parse_flag_value("1.7")); }, {"batch_size"});
  set_config_value(c, "max_iters", parse_flag_value("1e3"));
  EXPECT_EQ(c.max_iters, 1000);
  set_config_value(c, "seed", json(18446744073709551615ULL));
  EXPECT_EQ(c.seed, 18446744073709551615ULL);
  expect_error([&] { set_config_value(c, "seed", json(-1)); }, {"seed"});
  expect_error(
      [&] {
        set_config_value(c, "data", json::array({1, 2}));
      },
      {"config key 'data'", "an array of 2"});
}

TEST(ConfigLimits, BoundsNameTheKeyAndRange) {
  struct Case {
    const char* key;
    json value;
    const char* range;
  };
  const std::vector<Case> cases = {
      {"threads", 5000, "[0, 1024]"},
      {"n_layer", 1025, "[1, 1024]"},
      {"n_head", 2000, "[1, 1024]"},
      {"d_model", 1 << 17, "[1, 65536]"},
      {"seq_len", (1 << 20) + 1, "[1, 1048576]"},
      {"batch_size", 1 << 17, "[1, 65536]"},
      {"batch_size", 0, "[1, 65536]"},
      {"grad_accum", 1 << 17, "[1, 65536]"},
      {"max_iters", 2000000000, "[1, 1073741824]"},
      {"eval_iters", 0, "[1, 1048576]"},
      {"log_interval", 0, "[1, 1073741824]"},
      {"checkpoint_interval", -1, "[0, 1073741824]"},
      {"vocab_size", 70000, "[8, 65536]"},
      {"lr", std::nan(""), "(0, 100]"},
      {"lr", 0, "(0, 100]"},
      {"matrix_lr", std::numeric_limits<double>::infinity(), "(0, 100]"},
      {"beta2", 1.0, "[0, 1)"},
      {"muon_momentum", 1.5, "[0, 1)"},
      {"val_fraction", 0.0, "(0, 1)"},
      {"grad_clip", -1.0, "[0, 1e+09]"},
  };
  for (const auto& c : cases) {
    TrainConfig config;
    expect_error([&] { set_config_value(config, c.key, c.value); },
                 {std::string("config key '") + c.key + "'", c.range});
  }
  // validate() applies the same bounds to a config built in code.
  TrainConfig c;
  c.threads = 5000;
  expect_error([&] { c.validate(); }, {"config key 'threads'", "[0, 1024]"});
  c = TrainConfig{};
  c.lr = std::nan("");
  expect_error([&] { c.validate(); }, {"config key 'lr'", "finite"});
  c = TrainConfig{};
  EXPECT_NO_THROW(c.validate());
  // --help states the bounds.
  for (const auto& k : train_config_keys()) {
    if (k.name == "threads") {
      EXPECT_NE(k.help.find("[0..1024]"), std::string::npos) << k.help;
    }
  }
}

TEST(ConfigLimits, ConfigFilesGoThroughTheValidationLayer) {
  const std::string dir = test::temp_dir("config_files");
  expect_error([] { read_json_file("/dev/zero"); }, {"config file '/dev/zero'", "regular file"});
  expect_error([&] { read_json_file(dir); }, {"directory"});
  const std::string deep = write(dir + "/deep.json", deep_json(200000));
  expect_error([&] { read_json_file(deep); }, {"deep.json", "nested"});
  const std::string dup = write(dir + "/dup.json", R"({"lr": 0.1, "lr": 0.2})");
  expect_error([&] { read_json_file(dup); }, {"dup.json", "twice"});
  const std::string ok = write(dir + "/ok.json", R"({"n_layer": 2, "lr": 0.1})");
  TrainConfig c;
  apply_config_json(c, read_json_file(ok));
  EXPECT_EQ(c.n_layer, 2);
}

TEST(ConfigLimits, ModelConfigFromCheckpointMetadataIsRangeChecked) {
  json m = {{"vocab_size", 64}, {"n_layer", 2}, {"n_head", 2}, {"d_model", 32}, {"seq_len", 16}};
  EXPECT_EQ(ModelConfig::from_json(m).n_layer, 2);
  json bad = m;
  bad["n_layer"] = 4294967297LL;
  expect_error([&] { ModelConfig::from_json(bad); }, {"n_layer", "4294967297"});
  bad = m;
  bad["d_model"] = 32.5;
  expect_error([&] { ModelConfig::from_json(bad); }, {"d_model", "32.5"});
  bad = m;
  bad["seq_len"] = 1 << 21;
  expect_error([&] { ModelConfig::from_json(bad); }, {"seq_len", "1048576"});
  bad = m;
  bad.erase("n_head");
  expect_error([&] { ModelConfig::from_json(bad); }, {"n_head"});
}

// ---- the memory guard ------------------------------------------------------------------------

TEST(MemoryGuard, EstimateCountsWhatTheModelAllocates) {
  ModelConfig m;
  m.vocab_size = 64;
  m.n_layer = 2;
  m.n_head = 2;
  m.d_model = 32;
  m.seq_len = 16;
  const std::int64_t B = 3, T = 16, n = B * T, d = 32, f = m.ffn_size(), V = 64, H = 2, L = 2;
  const MemoryEstimate e = estimate_memory(m, B, T, /*training=*/true);
  EXPECT_EQ(e.weights, static_cast<std::uint64_t>(m.num_params()) * 4);
  EXPECT_EQ(e.grads, e.weights);
  EXPECT_EQ(e.optimizer, 2 * e.weights);
  // src/model/llama.cpp ensure_buffers: per layer, the tail, one layer's backward scratch, and
  // the model's copy of the tokens and targets.
  const std::int64_t probs = B * H * T * T;
  const std::int64_t elements = L * (8 * n * d + 2 * n + probs + 3 * n * f) +
                                (3 * n * d + 2 * n + n * V) +
                                (7 * n * d + 3 * n * f + n * V + probs) + 2 * n;
  EXPECT_EQ(e.activations, static_cast<std::uint64_t>(elements) * 4);
  EXPECT_EQ(estimate_memory(m, B, T, false).optimizer, 0u);
  // Grouped-query attention: the fused q | k | v rows (and their gradient) are d + 2 kv wide,
  // the probabilities stay per query head; a tied head has no weights of its own.
  ModelConfig g = m;
  g.n_head = 4;
  g.n_kv_head = 1;
  g.tie_embeddings = true;
  const std::int64_t kv = 8, qkv = d + 2 * kv, probs4 = B * 4 * T * T;
  const MemoryEstimate ge = estimate_memory(g, B, T, true);
  EXPECT_EQ(ge.weights, static_cast<std::uint64_t>(g.num_params()) * 4);
  EXPECT_EQ(g.num_params(), m.num_params() - V * d - L * 2 * (d - kv) * d);
  const std::int64_t g_elements = L * (5 * n * d + n * qkv + 2 * n + probs4 + 3 * n * f) +
                                  (3 * n * d + 2 * n + n * V) +
                                  (4 * n * d + n * qkv + 3 * n * f + n * V + probs4) + 2 * n;
  EXPECT_EQ(ge.activations, static_cast<std::uint64_t>(g_elements) * 4);
  // The largest shapes the bounds allow do not overflow: the estimate saturates.
  ModelConfig huge = m;
  huge.n_layer = kMaxLayers;
  huge.n_head = kMaxHeads;
  huge.d_model = kMaxDModel;
  huge.seq_len = kMaxSeqLen;
  huge.vocab_size = kMaxVocab;
  const MemoryEstimate h = estimate_memory(huge, 1 << 16, kMaxSeqLen, true);
  EXPECT_GT(h.total(), std::uint64_t{1} << 60);
}

TEST(MemoryGuard, RefusesABatchThatCannotFit) {
  ModelConfig m;
  m.vocab_size = 64;
  m.n_layer = 4;
  m.n_head = 4;
  m.d_model = 128;
  m.seq_len = 256;
  const MemoryLimit four_gib{std::uint64_t{4} << 30, "RLIMIT_AS, the address-space limit"};
  EXPECT_NO_THROW(check_batch_memory(m, 12, 256, true, "pion train", four_gib));
  expect_error([&] { check_batch_memory(m, 1000000, 256, true, "pion train", four_gib); },
               {"pion train", "batch_size 1000000 x seq_len 256", "GiB for activations",
                "this process may use 4.0 GiB", "RLIMIT_AS", "lower batch_size or seq_len"});
  const MemoryLimit real = process_memory_limit();
  EXPECT_GT(real.bytes, std::uint64_t{1} << 26) << real.source;
  EXPECT_FALSE(real.source.empty());
}

// The trainer's guard counts the optimizer state its optimizers will keep: planned before the
// first step = what one step allocates, for every optimizer and the Pion variants whose state
// differs; and a limit that AdamW's two moments fit under stops Pion's larger default state.
TEST(MemoryGuard, OptimizerStateIsCountedAsTheOptimizersWillKeepIt) {
  ModelConfig m;
  m.vocab_size = 32;
  m.n_layer = 1;
  m.n_head = 2;
  m.d_model = 32;
  m.ffn_hidden = 128;
  m.seq_len = 8;
  Llama<float> model(m);
  Rng rng(7);
  for (float& g : model.grads().span<float>()) g = static_cast<float>(rng.normal());
  for (float& w : model.params().span<float>()) w = 0.1f * static_cast<float>(rng.normal());
  struct Case {
    std::string optimizer, momentum, side, normalizer;
  };
  std::map<std::string, std::size_t> planned;
  for (const Case& c : std::vector<Case>{{"adamw", "lie", "both", "adam"},
                                         {"muon", "lie", "both", "adam"},
                                         {"pion", "lie", "both", "adam"},
                                         {"pion", "lie", "left", "adam"},
                                         {"pion", "ambient", "both", "adam"},
                                         {"pion", "lie", "alternate", "msign"}}) {
    TrainConfig cfg;
    cfg.optimizer = c.optimizer;
    cfg.pion_momentum = c.momentum;
    cfg.pion_update_side = c.side;
    cfg.pion_normalizer = c.normalizer;
    const std::string name = c.optimizer + "/" + c.momentum + "/" + c.side + "/" + c.normalizer;
    OptimizerSet set = build_optimizers(cfg, model.named_params());
    const std::size_t plan = set.planned_state_bytes();
    EXPECT_EQ(set.state_bytes(), 0u) << name << ": state is created lazily";
    ASSERT_TRUE(set.step()) << name;
    EXPECT_EQ(set.state_bytes(), plan) << name;
    planned[name] = plan;
  }
  const std::size_t adamw = planned["adamw/lie/both/adam"];
  const std::size_t pion = planned["pion/lie/both/adam"];
  EXPECT_GT(pion, adamw) << "the [128, 32] MLP matrices keep 2 (m^2 + n^2) floats each";
  EXPECT_LT(planned["pion/lie/left/adam"], pion);
  // A limit between the two: AdamW's state fits, Pion's does not, and the error says so.
  const MemoryEstimate base = estimate_memory(m, 2, 8, true, 4, 0);
  const MemoryLimit limit{base.total() + (adamw + pion) / 2, "a test limit"};
  EXPECT_NO_THROW(check_training_memory(m, 2, 8, adamw, "pion train", limit));
  expect_error([&] { check_training_memory(m, 2, 8, pion, "pion train", limit); },
               {"pion train", "of optimizer state", "a test limit",
                "an optimizer with less state"});
}

// ---- through the binary ----------------------------------------------------------------------

TEST(CliLimits, ConfigValuesAndFiles) {
  const std::string dir = test::temp_dir("cli_config");
  const std::string out = " --out_dir " + dir + "/out";
  write(dir + "/deep.json", deep_json(200000));
  expect_cli_error("train --n_layer 4294967297" + out, {"n_layer", "[1, 1024]", "4294967297"});
  expect_cli_error("train --batch_size 1.7" + out, {"batch_size", "1.7"});
  expect_cli_error("train --lr nan" + out, {"'lr'", "finite", "got nan"});
  expect_cli_error("train --threads 5000" + out, {"threads", "[0, 1024]"});
  expect_cli_error("train --config " + dir + "/deep.json" + out, {"deep.json", "nested"});
  expect_cli_error("train --config /dev/zero" + out, {"/dev/zero", "not a regular file"});
  expect_cli_error("train --config " + dir + out, {dir, "directory"});
  expect_cli_error("optim-trace --optimizer adamw --config /dev/zero --input a --output b",
                   {"/dev/zero", "not a regular file"});
  EXPECT_FALSE(std::filesystem::exists(dir + "/out")) << "nothing is written for a bad config";
}

TEST(CliLimits, DataFilesMustBeRegular) {
  const std::string dir = test::temp_dir("cli_data");
  expect_cli_error("train --data /dev/zero --out_dir " + dir + "/out", {"/dev/zero", "regular"});
  expect_cli_error("prepare --input /dev/zero --out " + dir + "/prep", {"/dev/zero", "regular"});
}

TEST(CliLimits, NumericFlagsOfEverySubcommand) {
  const std::string dir = test::temp_dir("cli_flags");
  const std::string ck = " --checkpoint " + dir + "/none.safetensors";
  expect_cli_error("eval --batches 0 --data d" + ck, {"--batches", "[1, 1000000]"});
  expect_cli_error("eval --max_examples=-3 --tasks t" + ck, {"--max_examples"});
  expect_cli_error("sample --temperature nan" + ck, {"--temperature", "nan", "[0, 100]"});
  expect_cli_error("sample --temperature inf" + ck, {"--temperature"});
  expect_cli_error("sample --top_k=-1" + ck, {"--top_k"});
  expect_cli_error("sample --tokens 0" + ck, {"--tokens"});
  expect_cli_error("finetune --from a --tasks b --eval_examples 0", {"--eval_examples"});
  expect_cli_error("prepare --val_fraction nan --out " + dir + "/p", {"--val_fraction"});
  expect_cli_error("prepare --vocab_size 100000 --out " + dir + "/p", {"--vocab_size"});
  expect_cli_error("make-task arithmetic --n 0 --out " + dir + "/t.jsonl", {"--n"});
  expect_cli_error("make-task arithmetic --max_digits 5000 --out " + dir + "/t.jsonl",
                   {"--max_digits"});
  expect_cli_error("train --stop_after=-1 --out_dir " + dir + "/o", {"--stop_after"});
  expect_cli_error("train --collective_timeout nan --out_dir " + dir + "/o",
                   {"--collective_timeout"});
  expect_cli_error("bench optim --drift_lr nan", {"--drift_lr"});
  expect_cli_error("bench optim --steps 0", {"--steps"});
  expect_cli_error("bench train --batch=-1", {"--batch"});
  expect_cli_error("bench train --steps 0", {"--steps"});
  expect_cli_error("bench train --seq_len=-1", {"--seq_len"});
  expect_cli_error("bench train --warmup 1 --steps 1 --profile_step 3",
                   {"--profile_step 3", "past the last step"});
  expect_cli_error("bench train --device cpu --profile_step 1", {"--profile_step", "--device cuda"});
  expect_cli_error("eval --batches abc" + ck, {"--batches"});  // a CLI11 conversion error
}

// The guard runs before anything sized by batch_size x seq_len is allocated: under a 4 GB
// address-space limit the run ends with the guard's message and exit 2, not a bad_alloc, a
// crash or the OOM killer.
TEST(CliLimits, MemoryGuardUnderUlimit) {
  if (std::getenv("PION_SANITIZED"))
    GTEST_SKIP() << "AddressSanitizer reserves terabytes of address space and cannot start under "
                    "ulimit -v; the Release run of this test covers the guard";
  const std::string dir = test::temp_dir("cli_memory");
  std::string text;
  for (int i = 0; i < 400; ++i)
    text += "the quick brown fox jumps over the lazy dog " + std::to_string(i) + "\n";
  write(dir + "/corpus.txt", text);
  const std::string limited =
      "bash -c 'ulimit -v 4000000; OMP_NUM_THREADS=1 "
      "OPENBLAS_NUM_THREADS=1 exec " PION_BINARY " ";
  {
    const auto r =
        test::run_command(limited + "train --data " + dir + "/corpus.txt --out_dir " + dir +
                          "/out --batch_size 65536 --seq_len 256 --max_iters 1" + " --threads 1'");
    EXPECT_EQ(r.exit_code, 2) << r.output;
    EXPECT_TRUE(test::single_error_line(r.output)) << r.output;
    for (const char* needle :
         {"batch_size 65536 x seq_len 256", "GiB for activations", "lower batch_size or seq_len"})
      EXPECT_NE(r.output.find(needle), std::string::npos) << needle << "\n" << r.output;
    // The limit named is ulimit -v's, unless physical memory is smaller still.
    if (process_memory_limit().bytes > 4000000ULL * 1024) {
      EXPECT_NE(r.output.find("RLIMIT_AS"), std::string::npos) << r.output;
    }
  }

  // A checkpoint whose saved config asks for a batch that cannot fit (tampered metadata; the
  // file is rewritten through the library, so its checksums are valid): `pion eval` refuses it
  // before allocating the evaluation batches.
  const auto trained =
      test::run_pion("train --data " + dir + "/corpus.txt --out_dir " + dir +
                     "/tiny --n_layer 1 --n_head 2 --d_model 32 --seq_len 16 --batch_size 4"
                     " --max_iters 2 --eval_iters 1 --eval_interval 0 --threads 1");
  ASSERT_EQ(trained.exit_code, 0) << trained.output;
  const std::string ckpt = dir + "/tiny/checkpoint.safetensors";
  TensorFile file = load_safetensors(ckpt);
  json cfg = json::parse(file.metadata.at("pion.config"));
  cfg["batch_size"] = 65536;
  cfg["seq_len"] = 4096;
  file.metadata["pion.config"] = cfg.dump();
  const std::string tampered = dir + "/tiny/tampered.safetensors";
  save_safetensors(tampered, file);
  const auto r = test::run_command(limited + "eval --checkpoint " + tampered + "'");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_TRUE(test::single_error_line(r.output)) << r.output;
  for (const char* needle : {"pion eval", "tampered.safetensors", "batch_size 65536 x seq_len 4096",
                             "lower batch_size or seq_len"})
    EXPECT_NE(r.output.find(needle), std::string::npos) << needle << "\n" << r.output;

  // `pion finetune` from the good checkpoint with a batch that cannot fit: refused before the
  // examples are loaded or batched, and before anything is written.
  write(
      dir + "/pairs.jsonl",
      "{\"prompt\": \"1+1=\", \"response\": \"2\"}\n{\"prompt\": \"2+2=\", \"response\": \"4\"}\n");
  const auto ft =
      test::run_command(limited + "finetune --from " + ckpt + " --tasks " + dir +
                        "/pairs.jsonl --batch_size 65536 --out_dir " + dir + "/ft --threads 1'");
  EXPECT_EQ(ft.exit_code, 2) << ft.output;
  EXPECT_TRUE(test::single_error_line(ft.output)) << ft.output;
  for (const char* needle :
       {"pion finetune", "batch_size 65536 x seq_len 16", "lower batch_size or seq_len"})
    EXPECT_NE(ft.output.find(needle), std::string::npos) << needle << "\n" << ft.output;
  EXPECT_FALSE(std::filesystem::exists(dir + "/ft"));
}
