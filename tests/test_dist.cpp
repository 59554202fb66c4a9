// Data-parallel training over MPI (pion/dist): `mpirun -np 2 pion train` must give the
// weights of a 1-process run with the same global batch, shard the optimizer state, write the
// same checkpoint format whatever N (so a run resumes with another N), and end cleanly with
// an intact checkpoint when a rank dies or hangs. The unit tests of the ownership plan and of
// the state merge/shard run without MPI.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <numeric>
#include <set>

#include "helpers.h"
#include "pion/core/random.h"
#include "pion/core/safetensors.h"
#include "pion/dist/communicator.h"
#include "pion/dist/shard.h"
#include "pion/model/llama.h"
#include "pion/train/build_optimizer.h"
#include "pion/train/config.h"

using namespace pion;
namespace fs = std::filesystem;

namespace {

// Why the multi-process tests cannot run here, or "" when they can.
std::string mpi_skip_reason() {
  if (!dist::mpi_compiled())
    return "pion was built without MPI (PION_MPI=OFF or no libopenmpi-dev)";
  if (test::run_command("command -v mpirun").exit_code != 0)
    return "mpirun is not on PATH (apt-get install openmpi-bin)";
  return "";
}

#define SKIP_WITHOUT_MPI()                     \
  do {                                         \
    const std::string why = mpi_skip_reason(); \
    if (!why.empty()) GTEST_SKIP() << why;     \
  } while (false)

std::string make_corpus(const std::string& dir) {
  std::string text;
  std::ifstream in(test::source_dir() + "/../shared/data/tinyshakespeare.txt");
  if (in) {
    text.resize(40000);
    in.read(text.data(), static_cast<std::streamsize>(text.size()));
    text.resize(static_cast<std::size_t>(in.gcount()));
  }
  for (int i = 0; i < 2000; ++i)
    text += "line " + std::to_string(i * 7919 % 1000) + " of the text\n";
  const std::string path = dir + "/corpus.txt";
  std::ofstream(path) << text;
  return path;
}

// A small model; dropout off so 1 and 2 ranks compute the same function. grad_clip 0.5 so
// the clip (on the all-reduced norm) is active.
std::string flags(const std::string& data, const std::string& out, const std::string& optimizer,
                  int iters) {
  return "--data " + data + " --out_dir " + out + " --optimizer " + optimizer +
         " --n_layer 2 --n_head 2 --d_model 32 --seq_len 16 --batch_size 8 --max_iters " +
         std::to_string(iters) +
         " --warmup_iters 3 --eval_interval 10 --eval_iters 2 --log_interval 10 --threads 1"
         " --matrix_lr 0.02 --lr 0.003 --dropout 0 --grad_clip 0.5";
}

// The environment of every mpirun-launched rank. OpenMPI never frees some of its start-up
// allocations, in components it has dlclose'd by exit, so LeakSanitizer (in the sanitizer
// build) would fail every rank with stacks it cannot even attribute: the ranks run with leak
// detection off, everything else of ASan + UBSan on. pion's own code is leak-checked by the
// single-process runs of the same tests and by the unit tests above.
const char* kRankEnv = "OMP_NUM_THREADS=1 ASAN_OPTIONS=detect_leaks=0 ";

test::CommandResult run_ranks(int ranks, const std::string& args) {
  return test::run_command(std::string(kRankEnv) +
                           "mpirun --allow-run-as-root --oversubscribe -np " +
                           std::to_string(ranks) + " " + PION_BINARY + " " + args);
}

// max over tensors with `prefix` of ||a - b|| / ||b||; fails if the name sets differ.
double max_rel_diff(const TensorFile& a, const TensorFile& b, const std::string& prefix) {
  std::set<std::string> na, nb;
  for (const auto& [k, t] : a.tensors)
    if (k.rfind(prefix, 0) == 0) na.insert(k);
  for (const auto& [k, t] : b.tensors)
    if (k.rfind(prefix, 0) == 0) nb.insert(k);
  EXPECT_EQ(na, nb) << "tensor names under '" << prefix << "' differ";
  EXPECT_FALSE(na.empty());
  double worst = 0.0;
  for (const auto& k : na) {
    if (!nb.count(k)) continue;
    const Tensor& ta = a.tensors.at(k);
    const Tensor& tb = b.tensors.at(k);
    EXPECT_EQ(ta.shape(), tb.shape()) << k;
    double num = 0, den = 0;
    const float* pa = ta.data<float>();
    const float* pb = tb.data<float>();
    for (std::int64_t i = 0; i < ta.numel(); ++i) {
      num += (static_cast<double>(pa[i]) - pb[i]) * (static_cast<double>(pa[i]) - pb[i]);
      den += static_cast<double>(pb[i]) * pb[i];
    }
    worst = std::max(worst, std::sqrt(num) / std::max(std::sqrt(den), 1e-30));
  }
  return worst;
}

nlohmann::json read_json(const std::string& path) {
  std::ifstream in(path);
  return nlohmann::json::parse(in);
}

}  // namespace

// ---- without MPI: the ownership plan and the state merge / shard ----------------------

TEST(Ownership, EveryParameterHasOneOwnerAndLoadIsBalancedByCost) {
  TrainConfig cfg;
  cfg.optimizer = "pion";
  ModelConfig mc;
  mc.vocab_size = 50;
  mc.n_layer = 3;
  mc.n_head = 2;
  mc.d_model = 32;
  mc.seq_len = 8;
  Llama<float> model(mc);
  auto params = model.named_params();
  const OptimizerSet full = build_optimizers(cfg, params);
  for (int world : {1, 2, 3}) {
    const auto plan = dist::plan_ownership(full, world);
    EXPECT_EQ(plan.owner.size(), params.size());
    for (const auto& [name, r] : plan.owner) EXPECT_TRUE(r >= 0 && r < world) << name;
    double total = 0, heaviest = 0;
    for (const auto& o : full.optimizers())
      for (const auto& g : o->groups())
        for (const auto& p : g.params) {
          const double c = dist::step_cost(o->kind(), p.value.shape());
          total += c;
          heaviest = std::max(heaviest, c);
        }
    // Greedy by cost: no rank exceeds the mean by more than the heaviest single parameter.
    for (double l : plan.load) EXPECT_LE(l, total / world + heaviest + 1e-9);
    EXPECT_NEAR(std::accumulate(plan.load.begin(), plan.load.end(), 0.0), total, 1e-6 * total);
  }
  // Pion's cost follows m n (m + n): the [2f, d] gate/up matrix outweighs the [d, d] wo.
  EXPECT_GT(dist::step_cost("pion", {176, 32}), 5.0 * dist::step_cost("pion", {32, 32}));
  EXPECT_GT(dist::step_cost("pion", {64, 32}), dist::step_cost("adamw", {64, 32}));
}

class ShardStateTest : public ::testing::TestWithParam<std::string> {};

// Stepping a whole optimizer set, then cutting its state dict into two ranks' shards, loading
// each into a set built from only that rank's parameters and merging their saves back must
// give the original state dict exactly: the checkpoint format does not depend on N.
TEST_P(ShardStateTest, ShardThenMergeIsTheIdentity) {
  TrainConfig cfg;
  cfg.optimizer = GetParam();
  ModelConfig mc;
  mc.vocab_size = 40;
  mc.n_layer = 2;
  mc.n_head = 2;
  mc.d_model = 16;
  mc.seq_len = 8;
  Llama<float> model(mc);
  Rng rng(7);
  model.init_weights(rng);
  auto params = model.named_params();
  OptimizerSet full = build_optimizers(cfg, params);
  for (int step = 0; step < 3; ++step) {
    Tensor g = test::random_tensor(model.grads().shape(), 100 + step, 0.1);
    std::copy(g.data<float>(), g.data<float>() + g.numel(), model.grads().data<float>());
    ASSERT_TRUE(full.step());
  }
  TensorFile saved;
  full.save_state(saved);
  const auto layout = dist::layout_of(full);
  const auto plan = dist::plan_ownership(full, 2);
  std::vector<TensorFile> shards;
  std::size_t state_bytes = 0;
  for (int r = 0; r < 2; ++r) {
    std::set<std::string> owned;
    for (const auto& [n, o] : plan.owner)
      if (o == r) owned.insert(n);
    ASSERT_FALSE(owned.empty());
    OptimizerSet part =
        build_optimizers(cfg, params, [&](const Param& p) { return owned.count(p.name) > 0; });
    part.load_state(dist::shard_optimizer_state(saved, layout, owned));
    state_bytes += part.state_bytes();
    EXPECT_LT(part.state_bytes(), full.state_bytes());
    TensorFile out;
    part.save_state(out);
    shards.push_back(dist::unpack(dist::pack(out)));  // as it travels between ranks
  }
  EXPECT_EQ(state_bytes, full.state_bytes());
  const TensorFile merged = dist::merge_optimizer_states(shards, layout);
  EXPECT_EQ(merged.metadata, saved.metadata);
  ASSERT_EQ(merged.tensors.size(), saved.tensors.size());
  EXPECT_EQ(max_rel_diff(merged, saved, "optim."), 0.0);
}

INSTANTIATE_TEST_SUITE_P(Optimizers, ShardStateTest, ::testing::Values("adamw", "muon", "pion"));

// ---- with mpirun ----------------------------------------------------------------------

class DistEqualityTest : public ::testing::TestWithParam<std::string> {};

// 2 ranks x 4 rows = 1 rank x 8 rows: after 20 steps the weights agree to 1e-5 relative (the
// only difference is the order of the gradient sums), the checkpoints have the same tensors
// and the same optimizer metadata, and each rank holds about half the optimizer state.
TEST_P(DistEqualityTest, TwoRanksMatchOneRank) {
  SKIP_WITHOUT_MPI();
  const std::string opt = GetParam();
  const std::string dir = test::temp_dir("dist_eq");
  const std::string corpus = make_corpus(dir);
  auto one = test::run_pion("train " + flags(corpus, dir + "/one", opt, 20));
  ASSERT_EQ(one.exit_code, 0) << one.output;
  auto two = run_ranks(2, "train " + flags(corpus, dir + "/two", opt, 20));
  ASSERT_EQ(two.exit_code, 0) << two.output;
  EXPECT_NE(two.output.find("data parallel: 2 ranks, 4 rows each; gradients all-reduced in 3 "
                            "buckets, one per layer started during backward"),
            std::string::npos)
      << two.output;
  // Only rank 0 prints: one "done:" line.
  const auto done = two.output.find("done:");
  ASSERT_NE(done, std::string::npos) << two.output;
  EXPECT_EQ(two.output.find("done:", done + 1), std::string::npos) << two.output;

  const TensorFile a = load_safetensors(dir + "/one/checkpoint.safetensors");
  const TensorFile b = load_safetensors(dir + "/two/checkpoint.safetensors");
  const double rel = max_rel_diff(b, a, "model.");
  RecordProperty("max_rel_weight_diff", std::to_string(rel));
  std::cout << opt << ": 2 ranks vs 1 rank after 20 steps, max relative weight difference " << rel
            << "\n";
  EXPECT_LT(rel, 1e-5) << opt;
  EXPECT_GT(rel, 0.0) << "suspicious: bit-identical weights (did both runs use one process?)";
  EXPECT_LT(max_rel_diff(b, a, "optim."), 1e-4) << opt;
  for (const auto& [k, v] : a.metadata) {
    if (k.rfind("optim.", 0) == 0) {
      EXPECT_EQ(b.metadata.at(k), v) << k;
    }
  }

  const auto s1 = read_json(dir + "/one/summary.json");
  const auto s2 = read_json(dir + "/two/summary.json");
  EXPECT_EQ(s2.at("world_size"), 2);
  const double whole = s1.at("optimizer_state_bytes_per_rank").at(0).get<double>();
  const auto parts = s2.at("optimizer_state_bytes_per_rank");
  ASSERT_EQ(parts.size(), 2u);
  EXPECT_DOUBLE_EQ(parts[0].get<double>() + parts[1].get<double>(), whole);
  for (const auto& p : parts) EXPECT_LT(p.get<double>(), 0.65 * whole) << s2.dump();
  EXPECT_NEAR(s2.at("final_val_loss").get<double>(), s1.at("final_val_loss").get<double>(), 1e-4);
}

INSTANTIATE_TEST_SUITE_P(Optimizers, DistEqualityTest, ::testing::Values("adamw", "muon", "pion"));

// Grouped-query attention with a tied embedding and no norms: the tied embedding's gradient
// (lookup + head) is reduced after backward as one bucket, and nothing follows the last layer
// in the buffer (no final norm, no lm_head). 2 ranks still match 1.
TEST(DistEquality, GqaTiedNormFreeTwoRanksMatchOneRank) {
  SKIP_WITHOUT_MPI();
  const std::string dir = test::temp_dir("dist_gqa");
  const std::string corpus = make_corpus(dir);
  const std::string model = " --n_head 4 --n_kv_head 1 --tie_embeddings true --norm none"
                            " --init spectral --matrix_lr 0.005";
  auto one = test::run_pion("train " + flags(corpus, dir + "/one", "pion", 12) + model);
  ASSERT_EQ(one.exit_code, 0) << one.output;
  auto two = run_ranks(2, "train " + flags(corpus, dir + "/two", "pion", 12) + model);
  ASSERT_EQ(two.exit_code, 0) << two.output;
  const TensorFile a = load_safetensors(dir + "/one/checkpoint.safetensors");
  const TensorFile b = load_safetensors(dir + "/two/checkpoint.safetensors");
  EXPECT_EQ(a.tensors.count("model.lm_head.weight"), 0u);
  const double rel = max_rel_diff(b, a, "model.");
  std::cout << "GQA tied norm-free pion: 2 ranks vs 1 rank after 12 steps, max relative weight "
               "difference "
            << rel << "\n";
  EXPECT_LT(rel, 1e-5);
  EXPECT_GT(rel, 0.0) << "suspicious: bit-identical weights (did both runs use one process?)";
}

// A run stopped on 2 ranks resumes on 1, and one stopped on 1 resumes on 2; both end where an
// uninterrupted 1-rank run ends.
TEST(DistResume, ResumeAcrossAChangeOfRankCount) {
  SKIP_WITHOUT_MPI();
  const std::string dir = test::temp_dir("dist_resume");
  const std::string corpus = make_corpus(dir);
  auto straight = test::run_pion("train " + flags(corpus, dir + "/straight", "pion", 16));
  ASSERT_EQ(straight.exit_code, 0) << straight.output;

  auto first = run_ranks(2, "train " + flags(corpus, dir + "/a", "pion", 16) + " --stop_after 7");
  ASSERT_EQ(first.exit_code, 0) << first.output;
  auto second = test::run_pion("train " + flags(corpus, dir + "/a", "pion", 16) + " --resume");
  ASSERT_EQ(second.exit_code, 0) << second.output;
  EXPECT_NE(second.output.find("at step 7"), std::string::npos) << second.output;

  auto third = test::run_pion("train " + flags(corpus, dir + "/b", "pion", 16) + " --stop_after 9");
  ASSERT_EQ(third.exit_code, 0) << third.output;
  auto fourth = run_ranks(2, "train " + flags(corpus, dir + "/b", "pion", 16) + " --resume");
  ASSERT_EQ(fourth.exit_code, 0) << fourth.output;
  EXPECT_NE(fourth.output.find("at step 9"), std::string::npos) << fourth.output;

  const TensorFile ref = load_safetensors(dir + "/straight/checkpoint.safetensors");
  for (const std::string run : {"a", "b"}) {
    const TensorFile got = load_safetensors(dir + "/" + run + "/checkpoint.safetensors");
    EXPECT_LT(max_rel_diff(got, ref, "model."), 1e-5) << run;
    EXPECT_LT(max_rel_diff(got, ref, "optim."), 1e-4) << run;
    EXPECT_EQ(nlohmann::json::parse(got.metadata.at("pion.train")).at("step"), 16) << run;
  }
}

TEST(DistErrors, GlobalBatchMustDivideAmongRanks) {
  SKIP_WITHOUT_MPI();
  const std::string dir = test::temp_dir("dist_div");
  const std::string corpus = make_corpus(dir);
  auto r = run_ranks(2, "train " + flags(corpus, dir + "/o", "adamw", 4) + " --batch_size 7");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("must be divisible by world_size 2"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("pion: error: rank "), std::string::npos) << r.output;
}

// ---- GRPO (pion rl) under mpirun ------------------------------------------------------

namespace {

// A model that answers "q=" with "1" about 70% of the time and "2" otherwise (trained on such
// lines), and tasks whose answer is "1": sampled groups then mix rewards 1 and 0, so the
// policy-gradient term is active, not only the KL term.
struct RlFixture {
  std::string dir, ckpt, tasks;
};
const RlFixture& rl_fixture() {
  static const RlFixture f = [] {
    RlFixture x;
    x.dir = test::temp_dir("dist_rl");
    std::ofstream corpus(x.dir + "/corpus.txt");
    std::ofstream tasks(x.dir + "/tasks.jsonl");
    Rng rng(3);
    for (int i = 0; i < 3000; ++i)
      corpus << static_cast<char>('a' + i % 26) << "=" << (rng.uniform() < 0.7 ? "1" : "2") << "\n";
    for (int i = 0; i < 26; ++i)
      tasks << "{\"prompt\": \"" << static_cast<char>('a' + i) << "=\", \"answer\": \"1\"}\n";
    corpus.close();
    tasks.close();
    auto r = test::run_pion("train --data " + x.dir + "/corpus.txt --tokenizer char --n_layer 1"
                            " --n_head 2 --d_model 32 --seq_len 16 --batch_size 8 --max_iters 60"
                            " --lr 0.01 --eval_interval 0 --threads 1 --out_dir " + x.dir + "/base");
    EXPECT_EQ(r.exit_code, 0) << r.output;
    x.ckpt = x.dir + "/base/checkpoint.safetensors";
    x.tasks = x.dir + "/tasks.jsonl";
    return x;
  }();
  return f;
}

// P 4 prompts x G 4, two PPO epochs per sampled batch, the KL term on.
std::string rl_args(const std::string& out, int iters = 8) {
  const RlFixture& f = rl_fixture();
  return "rl --from " + f.ckpt + " --tasks " + f.tasks + " --out_dir " + out +
         " --max_iters " + std::to_string(iters) +
         " --rl_prompts_per_step 4 --rl_group_size 4 --rl_max_new_tokens 3 --ppo_epochs 2"
         " --kl_coef 0.05 --lr 0.003 --eval_interval 4 --log_interval 1 --threads 1"
         " --eval_examples 4";
}

std::vector<nlohmann::json> read_jsonl(const std::string& path) {
  std::ifstream in(path);
  std::vector<nlohmann::json> out;
  std::string line;
  while (std::getline(in, line)) out.push_back(nlohmann::json::parse(line));
  return out;
}

}  // namespace

// Every rank draws the same prompts and samples its half of the groups, each completion from
// its own generator: 2 ranks sample exactly the completions 1 rank samples (same rewards and
// lengths at every step) and, the objective being the mean over the global batch's completion
// tokens, follow the same weights up to the order of the gradient sums.
class DistRlEquality : public ::testing::TestWithParam<std::string> {};

TEST_P(DistRlEquality, TwoRanksSampleTheSameBatchesAndMatchOneRank) {
  SKIP_WITHOUT_MPI();
  const std::string extra = GetParam();
  const std::string dir = test::temp_dir("dist_rl_eq");
  auto one = test::run_pion(rl_args(dir + "/one") + extra);
  ASSERT_EQ(one.exit_code, 0) << one.output;
  auto two = run_ranks(2, rl_args(dir + "/two") + extra);
  ASSERT_EQ(two.exit_code, 0) << two.output;
  EXPECT_NE(two.output.find("data parallel: 2 ranks, 8 rows each"), std::string::npos)
      << two.output;
  const auto a = read_jsonl(dir + "/one/metrics.jsonl");
  const auto b = read_jsonl(dir + "/two/metrics.jsonl");
  ASSERT_EQ(a.size(), 8u);
  ASSERT_EQ(b.size(), a.size());
  bool mixed = false;  // some group had rewards 0 and 1: the policy gradient was not zero
  double redrawn = 0.0;
  double worst_loss = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(b[i]["reward_mean"], a[i]["reward_mean"]) << "step " << i + 1;
    EXPECT_EQ(b[i]["completion_len_mean"], a[i]["completion_len_mean"]) << "step " << i + 1;
    EXPECT_EQ(b[i]["no_signal_frac"], a[i]["no_signal_frac"]) << "step " << i + 1;
    EXPECT_EQ(b[i].value("resampled_groups", -1.0), a[i].value("resampled_groups", -1.0));
    redrawn += a[i].value("resampled_groups", 0.0);
    mixed = mixed || a[i]["no_signal_frac"].get<double>() < 1.0;
    worst_loss = std::max(worst_loss, std::abs(b[i]["train_loss"].get<double>() -
                                               a[i]["train_loss"].get<double>()));
    EXPECT_NEAR(b[i]["kl"].get<double>(), a[i]["kl"].get<double>(),
                1e-5 * (1.0 + std::abs(a[i]["kl"].get<double>())));
  }
  EXPECT_TRUE(mixed) << "no group ever had different rewards; the test checks nothing";
  if (!extra.empty()) {
    EXPECT_GT(redrawn, 0.0) << "dynamic sampling never redrew a group";
  }
  EXPECT_LT(worst_loss, 1e-5);
  const TensorFile wa = load_safetensors(dir + "/one/checkpoint.safetensors");
  const TensorFile wb = load_safetensors(dir + "/two/checkpoint.safetensors");
  const double rel = max_rel_diff(wb, wa, "model.");
  std::cout << "rl" << extra << ": 2 ranks vs 1 rank after 8 steps, max relative weight difference " << rel
            << ", worst loss difference " << worst_loss << "\n";
  EXPECT_LT(rel, 1e-5);
  EXPECT_GT(rel, 0.0) << "suspicious: bit-identical weights (did both runs use one process?)";
  const auto s = read_json(dir + "/two/summary.json");
  EXPECT_EQ(s.at("world_size"), 2);
  EXPECT_EQ(s.at("exact_match"), read_json(dir + "/one/summary.json").at("exact_match"));
}

// Without and with dynamic sampling (groups with equal rewards redrawn, each redraw from a
// stream named by the step, the group and the round: rank-independent too).
INSTANTIATE_TEST_SUITE_P(Sampling, DistRlEquality,
                         ::testing::Values("", " --rl_resample_rounds 2"));

// Stopped between the two PPO epochs of a sampled batch on 2 ranks, resumed on 1 (and the
// other way round): the checkpoint holds the whole batch, so both end where a straight 1-rank
// run ends.
TEST(DistRl, ResumeMidBatchAcrossAChangeOfRankCount) {
  SKIP_WITHOUT_MPI();
  const std::string dir = test::temp_dir("dist_rl_resume");
  auto straight = test::run_pion(rl_args(dir + "/straight"));
  ASSERT_EQ(straight.exit_code, 0) << straight.output;
  auto first = run_ranks(2, rl_args(dir + "/a") + " --stop_after 3");
  ASSERT_EQ(first.exit_code, 0) << first.output;
  auto second = test::run_pion(rl_args(dir + "/a") + " --resume");
  ASSERT_EQ(second.exit_code, 0) << second.output;
  auto third = test::run_pion(rl_args(dir + "/b") + " --stop_after 5");
  ASSERT_EQ(third.exit_code, 0) << third.output;
  auto fourth = run_ranks(2, rl_args(dir + "/b") + " --resume");
  ASSERT_EQ(fourth.exit_code, 0) << fourth.output;
  const TensorFile ref = load_safetensors(dir + "/straight/checkpoint.safetensors");
  const auto ref_metrics = read_jsonl(dir + "/straight/metrics.jsonl");
  for (const std::string run : {"a", "b"}) {
    const TensorFile got = load_safetensors(dir + "/" + run + "/checkpoint.safetensors");
    EXPECT_LT(max_rel_diff(got, ref, "model."), 1e-5) << run;
    const auto m = read_jsonl(dir + "/" + run + "/metrics.jsonl");
    ASSERT_EQ(m.size(), ref_metrics.size()) << run;
    for (std::size_t i = 0; i < m.size(); ++i)
      EXPECT_EQ(m[i]["reward_mean"], ref_metrics[i]["reward_mean"]) << run << " step " << i + 1;
  }
}

TEST(DistRl, PromptsMustDivideAmongRanks) {
  SKIP_WITHOUT_MPI();
  const std::string dir = test::temp_dir("dist_rl_div");
  auto r = run_ranks(2, rl_args(dir + "/o") + " --rl_prompts_per_step 3");
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("rl_prompts_per_step 3 must be divisible by the 2 ranks"),
            std::string::npos)
      << r.output;
}

namespace {

// Starts a long 2-rank run, waits for its first checkpoint, sends `signal` to rank 1 and
// reports the job's exit code, the seconds from the signal to the end, and the output.
struct FailureRun {
  int exit_code = -1;
  double seconds = 0;
  std::string output;
  std::string dir;
};
FailureRun run_and_signal(const std::string& signal, const std::string& extra) {
  FailureRun out;
  out.dir = test::temp_dir("dist_fail");
  const std::string corpus = make_corpus(out.dir);
  const std::string script = out.dir + "/run.sh";
  std::ofstream(script)
      << kRankEnv << "mpirun --allow-run-as-root --oversubscribe -np 2 " << PION_BINARY << " train "
      << flags(corpus, out.dir + "/o", "pion", 1000000)
      << " --eval_interval 0 --checkpoint_interval 10 " << extra << " > " << out.dir
      << "/log 2>&1 &\n"
      << "mp=$!\n"
      << "for i in $(seq 600); do [ -f " << out.dir
      << "/o/checkpoint.safetensors ] && break; sleep 0.05; done\n"
      << "sleep 0.2\n"
      // Rank 1 is the child of mpirun whose environment says so.
      << "for c in $(pgrep -P $mp); do\n"
      << "  if tr '\\0' '\\n' < /proc/$c/environ | grep -qx OMPI_COMM_WORLD_RANK=1; then kill -"
      << signal << " $c; fi\n"
      << "done\n"
      << "start=$(date +%s%N)\n"
      << "( sleep 60; kill -9 $mp ) >/dev/null 2>&1 & guard=$!\n"
      << "wait $mp; rc=$?\n"
      << "kill $guard 2>/dev/null\n"
      << "echo \"SECONDS_TO_END $(( ($(date +%s%N) - start) / 1000000 ))\"\n"
      << "cat " << out.dir << "/log\n"
      << "exit $rc\n";
  auto r = test::run_command("bash " + script);
  out.exit_code = r.exit_code;
  out.output = r.output;
  const auto at = r.output.find("SECONDS_TO_END ");
  if (at != std::string::npos) out.seconds = std::stod(r.output.substr(at + 15)) / 1000.0;
  return out;
}

// The checkpoint left behind (at step >= min_step) loads and training continues from it on
// one process.
void expect_checkpoint_usable(const std::string& dir, int min_step = 10) {
  const std::string ckpt = dir + "/o/checkpoint.safetensors";
  const TensorFile file = load_safetensors(ckpt);
  const int step = nlohmann::json::parse(file.metadata.at("pion.train")).at("step").get<int>();
  EXPECT_GE(step, min_step);
  auto resumed = test::run_pion("train --out_dir " + dir + "/o --resume --max_iters " +
                                std::to_string(step + 2));
  EXPECT_EQ(resumed.exit_code, 0) << resumed.output;
}

}  // namespace

TEST(DistFailure, KilledRankEndsTheJobAndLeavesTheCheckpoint) {
  SKIP_WITHOUT_MPI();
  FailureRun r = run_and_signal("KILL", "");
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_GT(r.seconds, 0.0) << r.output;
  EXPECT_LT(r.seconds, 30.0) << r.output;
  // OpenMPI's mpirun names the dead rank and the signal.
  EXPECT_NE(r.output.find("rank 1"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("signal 9"), std::string::npos) << r.output;
  expect_checkpoint_usable(r.dir);
}

// A rank that stops answering (SIGSTOP: alive, no progress) trips the collective watchdog of
// the other rank, which ends the job with a message naming the intact checkpoint.
TEST(DistFailure, HungRankTripsTheCollectiveTimeout) {
  SKIP_WITHOUT_MPI();
  FailureRun r = run_and_signal("STOP", "--collective_timeout 2");
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_LT(r.seconds, 30.0) << r.output;
  EXPECT_NE(r.output.find("pion: error: rank 0: no progress in a collective for"),
            std::string::npos)
      << r.output;
  EXPECT_NE(r.output.find("checkpoint.safetensors is intact"), std::string::npos) << r.output;
  expect_checkpoint_usable(r.dir);
}

// SIGTERM to one rank (a scheduler's signal may reach ranks at different times) stops every
// rank at the same step with a fresh checkpoint: the signal is all-reduced, so rank 0 names
// it. Checkpoints by wall time after every step (checkpoint_minutes 0.0001) are agreed by all
// ranks too (a rank alone in the gather would hang the job until the 60 s guard).
TEST(DistFailure, SigtermToOneRankStopsEveryRankWithACheckpoint) {
  SKIP_WITHOUT_MPI();
  FailureRun r = run_and_signal("TERM", "--checkpoint_minutes 0.0001");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_LT(r.seconds, 30.0) << r.output;
  EXPECT_NE(r.output.find("interrupted by SIGTERM"), std::string::npos) << r.output;
  const auto summary = read_json(r.dir + "/o/summary.json");
  EXPECT_TRUE(summary.at("interrupted").get<bool>()) << summary.dump();
  const TensorFile file = load_safetensors(r.dir + "/o/checkpoint.safetensors");
  EXPECT_EQ(nlohmann::json::parse(file.metadata.at("pion.train")).at("step"), summary.at("iters"));
  expect_checkpoint_usable(r.dir, 1);  // the first checkpoint came after step 1
}
