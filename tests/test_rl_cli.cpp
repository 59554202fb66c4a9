// `pion rl` through the binary: metrics fields, bit-exact resume (stopped between the PPO
// epochs of one sampled batch), every optimizer, one-line errors for bad input; and the
// harder arithmetic tasks of `pion make-task`.
#include <gtest/gtest.h>

#include <fstream>
#include <string>
#include <vector>

#include "compare.h"
#include "expect_error.h"
#include "helpers.h"
#include "pion/core/error.h"
#include "pion/core/safetensors.h"
#include "pion/data/arithmetic.h"
#include "pion/data/finetune.h"
#include "pion/train/config.h"

using namespace pion;

namespace {

// A tiny base checkpoint (char tokenizer over the built-in corpus) and an RL task file, once.
struct Fixture {
  std::string dir, ckpt, tasks;
};
const Fixture& fixture() {
  static const Fixture f = [] {
    Fixture x;
    x.dir = test::temp_dir("rl_cli");
    auto r = test::run_pion("train --data fortunes --n_layer 1 --n_head 2 --d_model 32 "
                            "--seq_len 24 --batch_size 4 --max_iters 3 --eval_interval 0 "
                            "--threads 1 --out_dir " + x.dir + "/base");
    EXPECT_EQ(r.exit_code, 0) << r.output;
    x.ckpt = x.dir + "/base/checkpoint.safetensors";
    x.tasks = x.dir + "/tasks.jsonl";
    r = test::run_pion("make-task arithmetic --n 60 --max_digits 2 --answer_key answer --out " +
                       x.tasks);
    EXPECT_EQ(r.exit_code, 0) << r.output;
    return x;
  }();
  return f;
}

std::string rl_flags(const std::string& out) {
  const Fixture& f = fixture();
  return "rl --from " + f.ckpt + " --tasks " + f.tasks + " --out_dir " + out +
         " --max_iters 6 --rl_prompts_per_step 3 --rl_group_size 4 --rl_max_new_tokens 5"
         " --ppo_epochs 2 --kl_coef 0.05 --lr 0.01 --eval_interval 3 --log_interval 1"
         " --threads 1 --eval_examples 4";
}

std::vector<nlohmann::json> read_metrics(const std::string& path) {
  std::ifstream in(path);
  std::vector<nlohmann::json> out;
  std::string line;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line);
    j.erase("elapsed_seconds");  // wall time differs between runs
    j.erase("tokens_per_sec");
    out.push_back(j);
  }
  return out;
}

// The data state in a checkpoint's pion.train metadata (a JSON string), parsed.
nlohmann::json data_state_of(const TensorFile& f) {
  const auto train = nlohmann::json::parse(f.metadata.at("pion.train"));
  return nlohmann::json::parse(train.at("data_state").get<std::string>());
}

// Saves `f` at `ckpt` with its data state replaced by `state` (checksums recomputed, so only
// the values are wrong).
void save_with_data_state(const std::string& ckpt, TensorFile f, const nlohmann::json& state) {
  auto train = nlohmann::json::parse(f.metadata.at("pion.train"));
  train["data_state"] = state.dump();
  f.metadata["pion.train"] = train.dump();
  save_safetensors(ckpt, f);
}

}  // namespace

TEST(RlCli, WritesRlMetricsEveryStep) {
  const std::string out = fixture().dir + "/metrics_run";
  auto r = test::run_pion(rl_flags(out));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto m = read_metrics(out + "/metrics.jsonl");
  ASSERT_EQ(m.size(), 6u);
  for (const auto& rec : m) {
    for (const char* key : {"reward_mean", "no_signal_frac", "completion_len_mean", "entropy",
                            "kl", "clip_frac", "ppo_epoch"})
      ASSERT_TRUE(rec.contains(key)) << key << " missing in " << rec.dump();
    EXPECT_FALSE(rec.contains("resampled_groups")) << "only with rl_resample_rounds > 0";
    EXPECT_GE(rec["reward_mean"].get<double>(), 0.0);
    EXPECT_LE(rec["reward_mean"].get<double>(), 1.0);
    EXPECT_GE(rec["completion_len_mean"].get<double>(), 1.0);
    EXPECT_LE(rec["completion_len_mean"].get<double>(), 5.0);
    EXPECT_GT(rec["entropy"].get<double>(), 0.0);
    EXPECT_GE(rec["kl"].get<double>(), 0.0);
  }
  // The first step's policy is the reference, so the KL term and its gradient are exactly 0
  // (the forward's own log-probs stand for the reference's, not the inference decoder's,
  // which differ by rounding). The base model (3 steps) answers nothing, so the first batch
  // has no signal and the whole gradient is the KL's: exactly 0, no step in a random
  // direction. The second step reuses the batch.
  EXPECT_EQ(m[0]["kl"].get<double>(), 0.0);
  ASSERT_EQ(m[0]["no_signal_frac"].get<double>(), 1.0) << "the fixture's base model answered";
  EXPECT_EQ(m[0]["grad_norm"].get<double>(), 0.0);
  EXPECT_EQ(m[0]["ppo_epoch"], 0);
  EXPECT_EQ(m[1]["ppo_epoch"], 1);
  EXPECT_EQ(m[0]["reward_mean"], m[1]["reward_mean"]);
  EXPECT_GT(m[1]["kl"].get<double>(), 0.0);  // the policy moved after one step
  EXPECT_TRUE(m[2].contains("exact_match"));
  EXPECT_TRUE(m[5].contains("exact_match"));
  EXPECT_NE(r.output.find("held-out exact match"), std::string::npos);
}

// 6 steps straight = 3 steps, stop (between the two PPO epochs of the second batch: the
// batch is in the checkpoint), resume to 6: same weights, optimizer state and metrics.
static void expect_resume_is_bit_exact(const std::string& dir, const std::string& extra) {
  auto a = test::run_pion(rl_flags(dir + "/ra") + extra);
  ASSERT_EQ(a.exit_code, 0) << a.output;
  auto b1 = test::run_pion(rl_flags(dir + "/rb") + extra + " --stop_after 3");
  ASSERT_EQ(b1.exit_code, 0) << b1.output;
  auto b2 = test::run_pion(rl_flags(dir + "/rb") + extra + " --resume");
  ASSERT_EQ(b2.exit_code, 0) << b2.output;
  EXPECT_NE(b2.output.find("resumed from"), std::string::npos);
  ASSERT_NO_FATAL_FAILURE(test::expect_same_tensors(dir + "/ra/checkpoint.safetensors",
                                                    dir + "/rb/checkpoint.safetensors"));
  EXPECT_EQ(read_metrics(dir + "/ra/metrics.jsonl"), read_metrics(dir + "/rb/metrics.jsonl"));
}

TEST(RlCli, ResumeIsBitExact) { expect_resume_is_bit_exact(fixture().dir, ""); }

// The base model's context is 24 tokens; RL batches of 12 (prompt <= 6 + 5 new tokens) train
// the same weights without the padding, and such a run resumes bit-exactly too.
TEST(RlCli, ShorterSeqLenTrainsAndResumes) {
  const std::string dir = fixture().dir + "/short";
  expect_resume_is_bit_exact(dir, " --seq_len 12");
  std::ifstream in(dir + "/ra/config.json");
  EXPECT_EQ(nlohmann::json::parse(in).at("seq_len"), 12);
}

// Dynamic sampling (rl_resample_rounds): groups with equal rewards are redrawn, counted per
// step, and a run stopped between PPO epochs still resumes bit-exactly.
TEST(RlCli, DynamicSamplingCountsRedrawsAndResumes) {
  const std::string dir = fixture().dir + "/resample";
  expect_resume_is_bit_exact(dir, " --rl_resample_rounds 2");
  const auto m = read_metrics(dir + "/ra/metrics.jsonl");
  ASSERT_EQ(m.size(), 6u);
  double redrawn = 0.0;
  for (const auto& rec : m) {
    ASSERT_TRUE(rec.contains("resampled_groups")) << rec.dump();
    const double n = rec["resampled_groups"].get<double>();
    EXPECT_GE(n, 0.0);
    EXPECT_LE(n, 2.0 * 3);  // 2 rounds x P 3
    redrawn += n;
  }
  // The fixture's barely trained model answers nothing right: every group is all zeros.
  EXPECT_GT(redrawn, 0.0);
}

// A checkpoint stopped between PPO epochs whose data state has a bad redraw count (negative,
// above rounds x P, not a number) is refused on resume naming the key, with exit 2.
TEST(RlCli, BadResampledGroupsInTheCheckpointNamesTheKey) {
  const std::string dir = fixture().dir + "/bad_resampled";
  const std::string flags = rl_flags(dir + "/r") + " --rl_resample_rounds 2";
  auto r = test::run_pion(flags + " --stop_after 3");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const std::string ckpt = dir + "/r/checkpoint.safetensors";
  const TensorFile good = load_safetensors(ckpt);
  for (const std::string bad : {"-1", "7", "\"x\""}) {
    auto state = data_state_of(good);
    ASSERT_TRUE(state.contains("resampled_groups")) << state.dump().substr(0, 200);
    state["resampled_groups"] = nlohmann::json::parse(bad);
    save_with_data_state(ckpt, good, state);
    test::expect_cli_error(flags + " --resume", {"'resampled_groups'"});
  }
}

// The data state's 'policy_is_reference' (true only while every step so far was skipped) must
// be a boolean: a string, a number, an array or an object is refused on resume naming it.
TEST(RlCli, BadPolicyIsReferenceInTheCheckpointNamesTheKey) {
  const std::string dir = fixture().dir + "/bad_policy_is_reference";
  const std::string flags = rl_flags(dir + "/r");
  auto r = test::run_pion(flags + " --stop_after 3");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const std::string ckpt = dir + "/r/checkpoint.safetensors";
  const TensorFile good = load_safetensors(ckpt);
  for (const std::string bad : {"\"yes\"", "2", "[true]", "{\"a\": true}"}) {
    auto state = data_state_of(good);
    state["policy_is_reference"] = nlohmann::json::parse(bad);
    save_with_data_state(ckpt, good, state);
    test::expect_cli_error(flags + " --resume", {"'policy_is_reference'"});
  }
}

// Without a KL term, rows whose group carries no signal (advantage 0) are left out of the
// micro-batches. A run with kl_coef 1e-300 trains every row (the KL term's value and gradient
// are below double's resolution next to the surrogate's), so the two runs must agree: the
// same sampled batches and metrics, and weights equal up to float summation order.
TEST(RlCli, LeavingOutRowsWithoutSignalChangesNothing) {
  const Fixture& f = fixture();
  const std::string dir = f.dir + "/leave_out";
  const std::string flags = "rl --from " + f.ckpt + " --tasks " + f.tasks +
                            " --max_iters 6 --rl_prompts_per_step 4 --rl_group_size 4"
                            " --rl_max_new_tokens 5 --ppo_epochs 2 --grad_accum 2 --lr 0.01"
                            " --eval_interval 0 --log_interval 1 --threads 1 --eval_examples 4";
  auto a = test::run_pion(flags + " --kl_coef 0 --out_dir " + dir + "/a");
  ASSERT_EQ(a.exit_code, 0) << a.output;
  auto b = test::run_pion(flags + " --kl_coef 1e-300 --out_dir " + dir + "/b");
  ASSERT_EQ(b.exit_code, 0) << b.output;
  const auto ma = read_metrics(dir + "/a/metrics.jsonl"), mb = read_metrics(dir + "/b/metrics.jsonl");
  ASSERT_EQ(ma.size(), 6u);
  ASSERT_EQ(mb.size(), 6u);
  double left_out = 0.0;
  for (std::size_t i = 0; i < ma.size(); ++i) {
    for (const char* key : {"reward_mean", "no_signal_frac", "completion_len_mean", "ppo_epoch"})
      EXPECT_EQ(ma[i][key], mb[i][key]) << key << " at step " << i + 1;
    for (const char* key : {"train_loss", "kl", "entropy", "clip_frac", "grad_norm"})
      EXPECT_NEAR(ma[i][key].get<double>(), mb[i][key].get<double>(),
                  1e-5 * (1.0 + std::abs(mb[i][key].get<double>())))
          << key << " at step " << i + 1;
    left_out += ma[i]["no_signal_frac"].get<double>();
  }
  EXPECT_GT(left_out, 0.0) << "no group without signal: the test checks nothing";
  const TensorFile wa = load_safetensors(dir + "/a/checkpoint.safetensors");
  const TensorFile wb = load_safetensors(dir + "/b/checkpoint.safetensors");
  for (const auto& [name, t] : wb.tensors) {
    if (name.rfind("model.", 0) != 0) continue;
    ASSERT_TRUE(wa.tensors.count(name)) << name;
    EXPECT_LT(test::rel_max_diff(wa.tensors.at(name), t), 1e-5) << name;
  }
}

// A row's sampling-time entropy in a mid-batch checkpoint (negative, huge, a string, nested)
// is refused naming it; the checkpoint is left as it was.
TEST(RlCli, BadRowEntropyInTheCheckpointNamesTheKey) {
  const std::string dir = fixture().dir + "/bad_entropy";
  const std::string flags = rl_flags(dir + "/r");
  auto r = test::run_pion(flags + " --stop_after 3");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const std::string ckpt = dir + "/r/checkpoint.safetensors";
  const TensorFile good = load_safetensors(ckpt);
  for (const std::string bad : {"-1", "1e300", "\"x\"", "[1]"}) {
    auto state = data_state_of(good);
    ASSERT_TRUE(state.contains("rows")) << state.dump().substr(0, 200);
    ASSERT_TRUE(state["rows"][0].contains("entropy"));
    state["rows"][0]["entropy"] = nlohmann::json::parse(bad);
    save_with_data_state(ckpt, good, state);
    test::expect_cli_error(flags + " --resume", {"entropy"});
  }
}

TEST(RlCli, EveryOptimizerRuns) {
  for (const std::string opt : {"muon", "pion"}) {
    const std::string out = fixture().dir + "/opt_" + opt;
    auto r = test::run_pion(rl_flags(out) + " --optimizer " + opt + " --max_iters 2");
    ASSERT_EQ(r.exit_code, 0) << opt << ": " << r.output;
    EXPECT_EQ(read_metrics(out + "/metrics.jsonl").size(), 2u) << opt;
  }
}

TEST(RlCli, BadInputIsOneLineErrorExit2) {
  const Fixture& f = fixture();
  const std::string dir = f.dir;
  std::ofstream(dir + "/no_answer.jsonl") << R"({"prompt": "1+2=", "response": "3"})" << "\n";
  std::ofstream(dir + "/long.jsonl") << R"({"prompt": "1+2=", "answer": "3"})" << "\n"
                                     << R"({"prompt": ")" << std::string(30, '1')
                                     << R"(+2=", "answer": "3"})" << "\n";
  struct Case {
    std::string args, needle;
  };
  const std::string base = "rl --from " + f.ckpt + " --out_dir " + dir + "/bad --max_iters 1 ";
  const std::vector<Case> cases = {
      {base + "--tasks " + dir + "/no_answer.jsonl", "\"answer\""},
      {base + "--tasks " + f.tasks + " --rl_group_size 1", "rl_group_size"},
      {base + "--tasks " + dir + "/long.jsonl", "seq_len"},
      {base + "--tasks " + f.tasks + " --device cuda", "cuda"},
      {base + "--tasks " + f.tasks + " --task arithmetic", "exactly one"},
      {base + "--tasks " + f.tasks + " --rl_prompts_per_step 3 --rl_group_size 3 --grad_accum 2",
       "grad_accum"},
      {base + "--tasks " + f.tasks + " --seq_len 25", "context of 24"},
      {base + "--tasks " + f.tasks + " --d_model 64", "'d_model' comes from the checkpoint"},
      // finetune shares config_from_checkpoint: the same refusal for a longer context.
      {"finetune --from " + f.ckpt + " --tasks " + dir + "/no_answer.jsonl --out_dir " + dir +
           "/bad_ft --max_iters 1 --seq_len 25",
       "finetune: seq_len 25 is longer than the model's context of 24"},
  };
  for (const auto& c : cases) test::expect_cli_error(c.args, {c.needle});
}

// Every RL config key refuses a bad value (out of range, NaN, overflow, wrong type) with exit 2
// and one line naming the key, before anything runs.
TEST(RlCli, BadRlConfigValuesNameTheKey) {
  const std::string out = " --out_dir " + test::temp_dir("rl_bad_keys") + "/out";
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"--clip_eps -1", "clip_eps"},
      {"--kl_coef nan", "kl_coef"},
      {"--rl_temperature 1e400", "rl_temperature"},
      {"--ppo_epochs 0", "ppo_epochs"},
      {"--rl_top_p 2", "rl_top_p"},
      {"--rl_max_new_tokens 0", "rl_max_new_tokens"},
      {"--adv_eps abc", "adv_eps"},
      {"--rl_std_normalize maybe", "rl_std_normalize"},
      {"--rl_group_size 100000", "rl_group_size"},
      {"--rl_prompts_per_step 0", "rl_prompts_per_step"},
      {"--rl_resample_rounds -1", "rl_resample_rounds"},
      {"--rl_resample_rounds 101", "rl_resample_rounds"},
      {"--rl_resample_rounds 2.5", "rl_resample_rounds"},
      {"--rl_resample_rounds 99999999999999999999", "rl_resample_rounds"},
  };
  for (const auto& [flag, key] : cases)
    test::expect_cli_error("train " + flag + out, {"config key '" + key + "'"});
}

TEST(RlTasks, HarderArithmeticAndVerifier) {
  // Defaults are today's addition examples exactly.
  EXPECT_EQ(arithmetic_examples(50, 3, ArithmeticOptions{}), arithmetic_examples(50, 3, 1, 3));
  const auto ex = arithmetic_examples(300, 4, ArithmeticOptions{2, 3, "+-*"});
  int ops[3] = {0, 0, 0};
  for (const auto& e : ex) {
    EXPECT_EQ(arithmetic_expression_answer(e.prompt), e.response) << e.prompt;
    const auto at = e.prompt.find_first_of("+-*");
    ops[std::string("+-*").find(e.prompt[at])]++;
  }
  for (int n : ops) EXPECT_GT(n, 50);
  EXPECT_EQ(arithmetic_expression_answer("52-17="), "35");
  EXPECT_EQ(arithmetic_expression_answer("100-1="), "99");
  EXPECT_EQ(arithmetic_expression_answer("12*34="), "408");
  EXPECT_EQ(arithmetic_expression_answer("0*999="), "0");
  EXPECT_EQ(mul_decimal("99", "99"), "9801");
  EXPECT_THROW(arithmetic_expression_answer("3-5="), Error);
  EXPECT_THROW(arithmetic_examples(5, 1, ArithmeticOptions{1, 2, "/"}), Error);
  // The verifier: whitespace normalised, the end marker required.
  EXPECT_TRUE(answer_matches(" 35 \n", "35"));
  EXPECT_TRUE(answer_matches("a  b\n", "a b"));
  EXPECT_FALSE(answer_matches("35", "35"));
  EXPECT_FALSE(answer_matches("36\n", "35"));
  // Every rl key is in the typed table (--help lists it, checkpoints record it).
  TrainConfig c;
  EXPECT_THROW(set_config_value(c, "rl_group_size", 1), Error);
  EXPECT_THROW(set_config_value(c, "rl_std_normalize", 1), Error);
  set_config_value(c, "rl_std_normalize", false);
  EXPECT_FALSE(c.to_json()["rl_std_normalize"].get<bool>());
}
