// `pion train` with Pion's variants (pion_momentum, pion_update_side, pion_normalizer,
// pion_ns_steps) and the normalisation-free model (norm none), through the binary: bit-exact
// resume (the alternating side follows the checkpointed step count), what the checkpoint
// records, and one-line errors for what is not defined or not on the GPU yet.
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "compare.h"
#include "expect_error.h"
#include "helpers.h"
#include "pion/core/safetensors.h"

using namespace pion;
using test::expect_same_tensors;

namespace {

std::string make_corpus(const std::string& dir) {
  const std::string path = dir + "/corpus.txt";
  std::ofstream(path) << test::fallback_corpus(40000);
  return path;
}

// The tiny run of test_train.cpp, with Pion.
std::string tiny_flags(const std::string& data, const std::string& out) {
  return test::tiny_train_flags(data, out, "pion");
}

}  // namespace

// A norm-free model trained by transported-momentum Pion on alternating sides with Cayley:
// 12 steps straight equal 5 steps, a stop and a resume to 12, bit for bit; the checkpoint
// records norm none (no norm tensors) and the variant in the optimizer's group options.
TEST(TrainVariants, NormFreeAlternatingTransportedPionResumesBitExactly) {
  const std::string dir = test::temp_dir("train_variants");
  const std::string corpus = make_corpus(dir);
  const std::string variant =
      " --norm none --pion_momentum transported --pion_update_side alternate"
      " --pion_retraction cayley";
  auto straight = test::run_pion("train " + tiny_flags(corpus, dir + "/a") + variant);
  ASSERT_EQ(straight.exit_code, 0) << straight.output;
  auto first =
      test::run_pion("train " + tiny_flags(corpus, dir + "/b") + variant + " --stop_after 5");
  ASSERT_EQ(first.exit_code, 0) << first.output;
  // The model shape and optimizer come back from the checkpoint's config: no flags repeated.
  auto second = test::run_pion("train --out_dir " + dir + "/b --resume");
  ASSERT_EQ(second.exit_code, 0) << second.output;
  EXPECT_NE(second.output.find("resumed from"), std::string::npos) << second.output;
  expect_same_tensors(dir + "/a/checkpoint.safetensors", dir + "/b/checkpoint.safetensors");

  const TensorFile ckpt = load_safetensors(dir + "/a/checkpoint.safetensors");
  const auto model = nlohmann::json::parse(ckpt.metadata.at("pion.model_config"));
  EXPECT_EQ(model.at("norm"), "none");
  for (const auto& [name, t] : ckpt.tensors)
    EXPECT_EQ(name.find("norm.weight"), std::string::npos) << name;
  const auto config = nlohmann::json::parse(ckpt.metadata.at("pion.config"));
  EXPECT_EQ(config.at("pion_momentum"), "transported");
  EXPECT_EQ(config.at("pion_update_side"), "alternate");
  bool found_pion = false;
  for (const auto& [key, text] : ckpt.metadata) {
    if (key.find("meta") == std::string::npos || text.find("\"pion\"") == std::string::npos)
      continue;
    const auto meta = nlohmann::json::parse(text);
    if (meta.value("kind", "") != "pion") continue;
    found_pion = true;
    const auto& options = meta.at("groups").at(0).at("options");
    EXPECT_EQ(options.at("momentum"), "transported");
    EXPECT_EQ(options.at("update_side"), "alternate");
    EXPECT_EQ(options.at("normalizer"), "adam");
  }
  EXPECT_TRUE(found_pion) << "no Pion optimizer state in the checkpoint";

  // The checkpoint samples as the norm-free model it is.
  auto sample = test::run_pion("sample --checkpoint " + dir +
                               "/a/checkpoint.safetensors --prompt The --tokens 8");
  EXPECT_EQ(sample.exit_code, 0) << sample.output;
}

TEST(TrainVariants, MsignOnOneSideTrains) {
  const std::string dir = test::temp_dir("train_msign");
  const std::string corpus = make_corpus(dir);
  auto r = test::run_pion("train " + tiny_flags(corpus, dir + "/m") +
                          " --pion_normalizer msign --pion_update_side right --pion_ns_steps 4"
                          " --max_iters 6");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto summary = nlohmann::json::parse(std::ifstream(dir + "/m/summary.json"));
  EXPECT_EQ(summary.at("iters"), 6);
}

TEST(TrainVariants, UndefinedOrGpuOnlyCombinationsAreOneClearLine) {
  const std::string dir = test::temp_dir("train_variants_bad");
  const std::string out = " --out_dir " + dir + "/out";
  struct Case {
    std::string args, needle;
  };
  const std::vector<Case> cases = {
      {"train --optimizer pion --pion_normalizer msign --pion_momentum ambient" + out,
       "pion_normalizer msign needs pion_momentum lie"},
      {"train --optimizer pion --pion_momentum euclid" + out, "pion_momentum"},
      {"train --optimizer pion --pion_update_side top" + out, "pion_update_side"},
      {"train --optimizer pion --pion_normalizer rms" + out, "pion_normalizer"},
      {"train --optimizer pion --pion_ns_steps 0" + out, "pion_ns_steps"},
      {"train --norm layernorm" + out, "norm"},
      {"train --n_head 4 --n_kv_head 3" + out, "config key 'n_kv_head' must divide n_head"},
      {"train --n_kv_head -1" + out, "n_kv_head"},
      {"train --tie_embeddings maybe" + out, "config key 'tie_embeddings'"},
      {"train --rope_theta 0" + out, "config key 'rope_theta'"},
      {"train --norm_eps 2" + out, "config key 'norm_eps'"},
      {"train --cuda_graphs maybe" + out, "config key 'cuda_graphs'"},
  };
  for (const auto& c : cases) test::expect_cli_error(c.args, {c.needle});
  // --help lists the new keys.
  auto help = test::run_pion("train --help");
  for (const char* key :
       {"--pion_momentum", "--pion_update_side", "--pion_normalizer", "--pion_ns_steps", "--norm",
        "--n_kv_head", "--tie_embeddings", "--rope_theta", "--norm_eps", "--cuda_graphs"})
    EXPECT_NE(help.output.find(key), std::string::npos) << key;
}
