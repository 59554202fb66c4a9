// Damaged and hostile checkpoints: the safetensors format enforced exactly, pion's checksums
// detecting any flipped bit, and every class of bad metadata refused with exit 2 and one line,
// before anything sized by it is allocated (under `ulimit -v` 4 GB), leaving the checkpoint on
// disk byte for byte as it was.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>

#include "helpers.h"
#include "pion/core/error.h"
#include "pion/core/input.h"
#include "pion/core/safetensors.h"
#include "pion/train/checkpoint.h"

using namespace pion;
using nlohmann::json;
namespace fs = std::filesystem;

namespace {

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), {}};
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary) << bytes;
}

// A safetensors image assembled by hand from a header object and a data section, as another
// tool (or an attacker) might write it: no checksums.
std::string handmade(const json& header, const std::string& data) {
  const std::string h = header.dump();
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[static_cast<std::size_t>(i)] = static_cast<char>(h.size() >> (8 * i));
  return out + h + data;
}

json entry(std::uint64_t begin, std::uint64_t end, std::int64_t n) {
  return {{"dtype", "F32"}, {"shape", {n}}, {"data_offsets", {begin, end}}};
}

// One tiny trained run shared by the CLI tests (a character model of a few KB).
struct TinyRun {
  std::string dir, flags, ckpt;
};
const TinyRun& tiny_run() {
  static const TinyRun run = [] {
    TinyRun r;
    r.dir = test::temp_dir("guard");
    std::string text;
    for (int i = 0; i < 400; ++i) text += "the cat sat on mat " + std::to_string(i % 10) + "\n";
    write_bytes(r.dir + "/corpus.txt", text);
    r.flags = "--data " + r.dir + "/corpus.txt --out_dir " + r.dir +
              "/run --n_layer 1 --n_head 2 --d_model 16 --seq_len 8 --batch_size 2"
              " --max_iters 4 --eval_interval 2 --eval_iters 1 --threads 1 --optimizer pion";
    auto res = test::run_pion("train " + r.flags + " --stop_after 2");
    EXPECT_EQ(res.exit_code, 0) << res.output;
    r.ckpt = r.dir + "/run/checkpoint.safetensors";
    return r;
  }();
  return run;
}

// Runs `pion <args>` under a 4 GB address-space limit (not under ASan, whose shadow memory
// needs far more address space).
test::CommandResult run_limited(const std::string& args) {
  const bool sanitized = std::getenv("PION_SANITIZED") != nullptr;
  return test::run_command(std::string(sanitized ? "" : "ulimit -v 4000000; ") + PION_BINARY +
                           " " + args);
}

// Saves a copy of the tiny run's checkpoint changed by `edit` (checksums recomputed, so only
// the values are wrong), then checks that resuming from it and evaluating it both fail with
// one line containing `expect`, and that resume left the file byte-identical.
enum class By { Resume, Eval, Both };  // which readers use the damaged part
void expect_refused(const std::string& tag, const std::function<void(TensorFile&)>& edit,
                    const std::string& expect, By by = By::Both) {
  const TinyRun& run = tiny_run();
  const std::string dir = test::temp_dir("guard-" + tag);
  fs::copy(run.dir + "/run", dir + "/run", fs::copy_options::recursive);
  const std::string ckpt = dir + "/run/checkpoint.safetensors";
  TensorFile f = load_safetensors(ckpt);
  edit(f);
  save_safetensors(ckpt, f);
  const std::string before = read_bytes(ckpt);
  std::string flags = run.flags;
  flags.replace(flags.find(run.dir + "/run"), (run.dir + "/run").size(), dir + "/run");
  std::vector<std::string> commands;
  if (by != By::Eval) commands.push_back("train " + flags + " --resume");
  if (by != By::Resume) commands.push_back("eval --checkpoint " + ckpt + " --data " + run.dir + "/run/data");
  for (const std::string& args : commands) {
    auto r = run_limited(args);
    EXPECT_EQ(r.exit_code, 2) << tag << ": " << args << "\n" << r.output;
    EXPECT_TRUE(test::single_error_line(r.output)) << tag << "\n" << r.output;
    EXPECT_NE(r.output.find(expect), std::string::npos) << tag << ": wanted '" << expect << "'\n" << r.output;
    EXPECT_EQ(read_bytes(ckpt), before) << tag << ": the refused checkpoint was modified";
  }
}

void set_json(TensorFile& f, const std::string& key, const std::function<void(json&)>& edit) {
  json j = json::parse(f.metadata.at(key));
  edit(j);
  f.metadata[key] = j.dump();
}

}  // namespace

TEST(SafetensorsFormat, WrittenFilesCarryChecksumsForeignOnesStillLoad) {
  TensorFile f;
  f.tensors["a"] = test::random_tensor({3, 4}, 1);
  f.tensors["b"] = test::random_tensor({5}, 2);
  f.metadata["k"] = "v";
  const TensorFile ours = parse_safetensors(serialize_safetensors(f), "ours");
  EXPECT_TRUE(ours.checksummed);
  EXPECT_EQ(ours.metadata.size(), 1u);  // the checksum keys are not handed back
  std::string data(32, '\0');
  const TensorFile foreign = parse_safetensors(
      handmade({{"x", entry(0, 16, 4)}, {"y", entry(16, 32, 4)}}, data), "foreign");
  EXPECT_FALSE(foreign.checksummed);
  EXPECT_EQ(foreign.tensors.size(), 2u);
}

TEST(SafetensorsFormat, OffsetsMustTileTheDataSectionExactly) {
  const std::string data(32, '\0');
  struct Case {
    const char* what;
    std::string bytes;
    const char* message;
  };
  std::string dup_header = R"({"x":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
                           R"("x":{"dtype":"F32","shape":[4],"data_offsets":[16,32]}})";
  std::string dup(8, '\0');
  for (int i = 0; i < 8; ++i) dup[static_cast<std::size_t>(i)] = static_cast<char>(dup_header.size() >> (8 * i));
  dup += dup_header + data;
  std::string shrunk = handmade({{"x", entry(0, 16, 4)}, {"y", entry(16, 32, 4)}}, data);
  shrunk[0] = static_cast<char>(shrunk[0] - 1);  // header length one byte short: still JSON
  const std::vector<Case> cases = {
      {"duplicate names", dup, "appears twice"},
      {"overlap", handmade({{"x", entry(0, 16, 4)}, {"y", entry(8, 24, 4)}}, data.substr(0, 24)), "overlaps"},
      {"gap", handmade({{"x", entry(0, 16, 4)}, {"y", entry(20, 36, 4)}}, std::string(36, '\0')), "gap"},
      {"bytes after the tensors", handmade({{"x", entry(0, 16, 4)}}, data), "after the last tensor"},
      {"bytes inserted after the header",
       handmade({{"x", entry(0, 16, 4)}, {"y", entry(16, 32, 4)}}, "    " + data), "after the last tensor"},
      {"shrunk header length", shrunk, "safetensors file"},
      {"extra entry key", handmade({{"x", {{"dtype", "F32"}, {"shape", {4}}, {"data_offsets", {0, 16}}, {"z", 1}}}}, data.substr(0, 16)), "exactly dtype"},
      {"offset given as a float", handmade({{"x", {{"dtype", "F32"}, {"shape", {4}}, {"data_offsets", {0.0, 16.5}}}}}, data.substr(0, 16)), "data_offsets"},
  };
  for (const auto& c : cases) {
    try {
      parse_safetensors(c.bytes, "t.safetensors");
      ADD_FAILURE() << c.what << " was accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(c.message), std::string::npos) << c.what << ": " << e.what();
    }
  }
}

TEST(SafetensorsFormat, DeepJsonInTheHeaderIsAnErrorNotACrash) {
  std::string deep = R"({"__metadata__":{"k":"v"},"x":)" + std::string(200000, '[') +
                     std::string(200000, ']') + "}";
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i) bytes[static_cast<std::size_t>(i)] = static_cast<char>(deep.size() >> (8 * i));
  EXPECT_THROW(parse_safetensors(bytes + deep, "deep"), Error);
}

// Every single-bit flip anywhere in a pion training checkpoint is refused by the reader or the
// checkpoint check: the per-tensor CRCs name a damaged tensor, the file CRC covers the header.
TEST(SafetensorsFormat, AnyFlippedBitInAPionCheckpointIsRefused) {
  const std::string bytes = read_bytes(tiny_run().ckpt);
  ASSERT_GT(bytes.size(), 1000u);
  const std::uint64_t header_end =
      8 + (static_cast<unsigned char>(bytes[0]) |
           (static_cast<std::uint64_t>(static_cast<unsigned char>(bytes[1])) << 8) |
           (static_cast<std::uint64_t>(static_cast<unsigned char>(bytes[2])) << 16));
  ASSERT_LT(header_end, bytes.size());
  // Every bit of the length prefix and of every third header byte (every 16th under the
  // sanitizers), and 2000 bits spread over the tensor data. PION_EXHAUSTIVE=1 flips every
  // bit of the whole file (minutes; run by hand).
  const bool exhaustive = std::getenv("PION_EXHAUSTIVE") != nullptr;
  const std::size_t header_stride = exhaustive ? 1 : std::getenv("PION_SANITIZED") ? 16 : 3;
  std::vector<std::pair<std::size_t, int>> positions;
  for (std::size_t i = 0; i < header_end; i += i < 8 ? 1 : header_stride)
    for (int bit = 0; bit < 8; ++bit) positions.emplace_back(i, bit);
  const std::size_t data_bytes = bytes.size() - header_end;
  if (exhaustive) {
    for (std::size_t i = header_end; i < bytes.size(); ++i)
      for (int bit = 0; bit < 8; ++bit) positions.emplace_back(i, bit);
  } else {
    for (std::size_t k = 0; k < 2000; ++k)
      positions.emplace_back(header_end + (k * 7919) % data_bytes, static_cast<int>(k % 8));
  }
  std::size_t flips = 0, named_tensor = 0;
  std::string bad = bytes;
  for (const auto& [i, bit] : positions) {
    bad[i] = static_cast<char>(bytes[i] ^ (1 << bit));
    ++flips;
    try {
      TensorFile f = parse_safetensors(bad, "c.safetensors");
      check_pion_checkpoint(f, "c.safetensors");
      ADD_FAILURE() << "flip of bit " << bit << " of byte " << i << " was accepted";
    } catch (const Error& e) {
      named_tensor += std::string(e.what()).find("tensor \"") != std::string::npos;
    }
    bad[i] = bytes[i];
  }
  EXPECT_GT(flips, 1000u);
  EXPECT_GE(named_tensor, exhaustive ? 8 * data_bytes : 2000u);  // data flips name their tensor
}

TEST(CheckpointGuard, DamagedFilesAreRefusedByNameAndLeftAsTheyWere) {
  const TinyRun& run = tiny_run();
  const std::string dir = test::temp_dir("guard-files");
  const std::string good = read_bytes(run.ckpt);
  struct Case {
    std::string what;
    std::string bytes;
    std::string message;
  };
  std::string flipped = good;
  flipped[flipped.size() - 5] = static_cast<char>(flipped[flipped.size() - 5] ^ 0x10);
  std::string inserted = good;
  const std::uint64_t header_len = static_cast<unsigned char>(good[0]) |
                                   (static_cast<std::uint64_t>(static_cast<unsigned char>(good[1])) << 8);
  inserted.insert(8 + header_len, "xxxx");
  const std::vector<Case> cases = {
      {"flipped bit in the data", flipped, "is damaged"},
      {"bytes inserted after the header", inserted, "after the last tensor"},
      {"truncated", good.substr(0, good.size() / 2), "truncated"},
      {"empty", "", "too short"},
  };
  for (const auto& c : cases) {
    const std::string path = dir + "/c.safetensors";
    write_bytes(path, c.bytes);
    auto r = run_limited("eval --checkpoint " + path + " --data " + run.dir + "/run/data");
    EXPECT_EQ(r.exit_code, 2) << c.what << "\n" << r.output;
    EXPECT_TRUE(test::single_error_line(r.output)) << c.what << "\n" << r.output;
    EXPECT_NE(r.output.find(c.message), std::string::npos) << c.what << "\n" << r.output;
    EXPECT_EQ(read_bytes(path), c.bytes) << c.what;
  }
  auto dev = run_limited("eval --checkpoint /dev/zero --data " + run.dir + "/run/data");
  EXPECT_EQ(dev.exit_code, 2) << dev.output;
  EXPECT_NE(dev.output.find("not a regular file"), std::string::npos) << dev.output;
}

TEST(CheckpointGuard, BadTrainMetadataIsRefused) {
  expect_refused("step-negative", [](TensorFile& f) { set_json(f, "pion.train", [](json& j) { j["step"] = -3; }); }, "'step'", By::Resume);
  expect_refused("step-huge", [](TensorFile& f) { set_json(f, "pion.train", [](json& j) { j["step"] = 1000000000000LL; }); }, "'step'", By::Resume);
  expect_refused("step-float", [](TensorFile& f) { set_json(f, "pion.train", [](json& j) { j["step"] = 1.7; }); }, "'step'", By::Resume);
  expect_refused("rng-zero", [](TensorFile& f) { set_json(f, "pion.train", [](json& j) { j["dropout_rng"] = {0, 0, 0, 0}; }); }, "all-zero", By::Resume);
  expect_refused("deep-extra", [](TensorFile& f) {
    f.metadata["pion.extra"] = std::string(200000, '[') + std::string(200000, ']');
  }, "nested", By::Eval);
}

TEST(CheckpointGuard, BadOptimizerMetadataIsRefused) {
  auto optim_meta = [](TensorFile& f, const std::function<void(json&)>& edit) {
    for (auto& [k, v] : f.metadata)
      if (k.rfind("optim.", 0) == 0 && k.size() > 5 && k.substr(k.size() - 4) == "meta") {
        json j = json::parse(v);
        edit(j);
        v = j.dump();
      }
  };
  expect_refused("optim-steps", [&](TensorFile& f) { optim_meta(f, [](json& j) { j["steps"] = -1; }); }, "steps", By::Resume);
  expect_refused("optim-beta1", [&](TensorFile& f) {
    optim_meta(f, [](json& j) { for (auto& g : j["groups"]) g["options"]["beta1"] = 1.0; });
  }, "beta", By::Resume);
  expect_refused("optim-eps", [&](TensorFile& f) {
    optim_meta(f, [](json& j) { for (auto& g : j["groups"]) g["options"]["eps"] = 0.0; });
  }, "eps", By::Resume);
  expect_refused("optim-lr", [&](TensorFile& f) {
    optim_meta(f, [](json& j) { for (auto& g : j["groups"]) g["lr"] = -0.1; });
  }, "lr", By::Resume);
  expect_refused("optim-state-nan", [](TensorFile& f) {
    for (auto& [k, t] : f.tensors)
      if (k.rfind("optim.", 0) == 0) {
        t.data<float>()[0] = std::nanf("");
        break;
      }
  }, "non-finite", By::Resume);
}

TEST(CheckpointGuard, MetadataClaimingAHugeModelIsComparedWithTheTensorsFirst) {
  expect_refused("d_model", [](TensorFile& f) { set_json(f, "pion.model_config", [](json& j) { j["d_model"] = 4096; }); }, "model");
  expect_refused("n_layer", [](TensorFile& f) { set_json(f, "pion.model_config", [](json& j) { j["n_layer"] = 2000000000; }); }, "model");
  expect_refused("vocab", [](TensorFile& f) { set_json(f, "pion.model_config", [](json& j) { j["vocab_size"] = 1000000; }); }, "model");
  expect_refused("int-wrap", [](TensorFile& f) { set_json(f, "pion.model_config", [](json& j) { j["d_model"] = 4294967312LL; }); }, "model");
  expect_refused("nan-weight", [](TensorFile& f) { f.tensors.at("model.lm_head.weight").data<float>()[3] = std::nanf(""); }, "non-finite");
  expect_refused("stray-weight", [](TensorFile& f) { f.tensors["model.layers.7.attn.wq"] = test::random_tensor({2, 2}, 3); }, "model");
}

// A data state larger than a checkpoint keeps (pion rl between PPO epochs, a huge batch) is
// refused when saving, before anything is written: the last checkpoint stays byte for byte,
// no temp file is left, and the message says what to lower. The same for a safetensors
// header over the format's 100 MB, which no reader would load back.
TEST(CheckpointGuard, OversizedStateIsRefusedAtSaveLeavingTheLastCheckpoint) {
  const TinyRun& run = tiny_run();
  const std::string dir = test::temp_dir("guard-oversized");
  fs::copy(run.dir + "/run", dir + "/run", fs::copy_options::recursive);
  const std::string ckpt = dir + "/run/checkpoint.safetensors";
  const std::string before = read_bytes(ckpt);
  const TensorFile f = load_safetensors(ckpt);
  const ModelConfig model = ModelConfig::from_json(json::parse(f.metadata.at("pion.model_config")));
  try {
    write_train_checkpoint(ckpt, TrainConfig{}, model, f, TrainProgress{},
                           json(std::string(kMaxDataStateBytes + 1, '7')), Rng(1), json::object());
    ADD_FAILURE() << "an oversized data state was written";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("MiB a checkpoint keeps"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("ppo_epochs 1"), std::string::npos) << e.what();
  }
  EXPECT_EQ(read_bytes(ckpt), before);
  EXPECT_FALSE(fs::exists(ckpt + ".tmp"));

  TensorFile big = f;
  big.metadata["pion.extra"] = std::string(input::kMaxSafetensorsHeader + 1, ' ');
  try {
    save_safetensors(ckpt, big);
    ADD_FAILURE() << "a header over 100 MB was written";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("100 MB"), std::string::npos) << e.what();
  }
  EXPECT_EQ(read_bytes(ckpt), before);
  EXPECT_FALSE(fs::exists(ckpt + ".tmp"));
}
