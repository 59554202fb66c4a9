// GRPO (pion/train/grpo.h, `pion rl`): the loss and its gradient on fixed completions equal
// an independent PyTorch fp64 implementation (tests/reference/grpo_torch.py); equal rewards
// give zero advantages; the model's weighted loss matches finite differences.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "compare.h"
#include "grad_check.h"
#include "helpers.h"
#include "pion/core/error.h"
#include "pion/core/random.h"
#include "pion/core/safetensors.h"
#include "pion/model/llama.h"
#include "pion/train/grpo.h"

using namespace pion;

namespace {

// Rows of prompt (target -1) then completion tokens then padding (target -1), as `pion rl`
// lays them out: row r's completion starts at prompt_len[r] - 1 and has comp_len[r] targets.
std::vector<std::int32_t> completion_targets(const std::vector<std::int32_t>& tokens, int rows,
                                             int seq, std::vector<int> prompt_len,
                                             std::vector<int> comp_len) {
  std::vector<std::int32_t> targets(tokens.size(), -1);
  for (int r = 0; r < rows; ++r)
    for (int i = 0; i < comp_len[static_cast<std::size_t>(r)]; ++i) {
      const int pos = prompt_len[static_cast<std::size_t>(r)] - 1 + i;
      if (pos + 1 < seq) targets[static_cast<std::size_t>(r * seq + pos)] =
          tokens[static_cast<std::size_t>(r * seq + pos + 1)];
      else targets[static_cast<std::size_t>(r * seq + pos)] = 3;  // the last position's target
    }
  return targets;
}

struct GrpoCase {
  const char* name;
  double old_noise;  // logp_old = logp + noise (0: ratio 1)
  GrpoOptions options;
};

void check_against_torch(const GrpoCase& gc) {
  if (!test::python_has("torch numpy")) GTEST_SKIP() << "needs torch and numpy";
  const ModelConfig c = test::tiny_model_config();
  Llama<double> model(c);
  Rng rng(70);
  model.init_weights(rng);
  Llama<double> ref_model(c);
  ref_model.load_weights([&] {
    TensorFile f;
    model.save_weights(f);
    return f;
  }());
  for (auto& p : ref_model.named_params())
    for (double& w : p.value.span<double>()) w += 0.05 * rng.normal();

  const int group = 3, rows = 6, seq = 7;
  const auto n = static_cast<std::size_t>(rows * seq);
  const auto tokens = test::random_ids(n, c.vocab_size, 71);
  const auto targets =
      completion_targets(tokens, rows, seq, {2, 3, 2, 4, 1, 2}, {4, 3, 5, 2, 6, 3});
  // One binary group and one with graded rewards.
  const std::vector<double> rewards = {1, 0, 1, 0.2, 0.7, 0.4};
  const std::vector<double> adv_row = group_advantages(rewards, group, gc.options);

  std::vector<double> ref_logp(n), logp(n), logp_old(n), adv(n), weights(n);
  ref_model.forward(tokens, targets, rows, seq);
  ref_model.target_log_probs(ref_logp);
  model.forward(tokens, targets, rows, seq);
  model.target_log_probs(logp);
  Rng noise(72);
  for (std::size_t i = 0; i < n; ++i) {
    logp_old[i] = logp[i] + gc.old_noise * noise.normal();
    adv[i] = adv_row[i / static_cast<std::size_t>(seq)];
  }
  double tokens_count = 0;
  for (auto t : targets) tokens_count += t >= 0 ? 1 : 0;
  GrpoTokenStats stats;
  const double loss = grpo_token_objective(targets, logp, logp_old, ref_logp, adv, tokens_count,
                                           gc.options, weights, &stats);
  model.zero_grad();
  model.set_target_weights(weights);
  model.backward(1.0);
  if (gc.old_noise > 0) {
    EXPECT_GT(stats.clipped, 0) << "the case must exercise the clip";
    EXPECT_LT(stats.clipped, stats.tokens);
  } else {
    EXPECT_EQ(stats.clipped, 0);
  }

  auto dir = test::temp_dir("grpo_torch");
  TensorFile in;
  model.save_weights(in);
  in.tensors["tokens"] = Tensor::from_vector<std::int32_t>({rows, seq}, tokens);
  in.tensors["targets"] = Tensor::from_vector<std::int32_t>({rows, seq}, targets);
  in.tensors["rewards"] = Tensor::from_vector<double>({rows}, rewards);
  in.tensors["logp_old"] = Tensor::from_vector<double>({rows, seq}, logp_old);
  in.tensors["ref_logp"] = Tensor::from_vector<double>({rows, seq}, ref_logp);
  in.metadata["config"] = c.to_json().dump();
  in.metadata["grpo"] = nlohmann::json{{"group_size", group},
                                       {"clip_eps", gc.options.clip_eps},
                                       {"kl_coef", gc.options.kl_coef},
                                       {"adv_eps", gc.options.adv_eps},
                                       {"std_normalize", gc.options.std_normalize}}
                            .dump();
  save_safetensors(dir + "/in.safetensors", in);
  auto r = test::run_command(test::python() + " " + test::source_dir() +
                             "/tests/reference/grpo_torch.py " + dir + "/in.safetensors " + dir +
                             "/out.safetensors");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  TensorFile out = load_safetensors(dir + "/out.safetensors");
  const double ref_loss = out.tensors.at("loss").data<double>()[0];
  const double loss_err = std::abs(loss - ref_loss);
  EXPECT_LT(loss_err, 1e-10) << loss << " vs torch " << ref_loss;
  EXPECT_LT(test::rel_max_diff(Tensor::from_vector<double>({rows}, adv_row),
                               out.tensors.at("advantages")),
            1e-12);
  double worst_abs = 0, worst_rel = 0;
  for (auto& p : model.named_params()) {
    const Tensor& g = out.tensors.at("grad." + p.name);
    const double e = test::rel_max_diff(p.grad, g);
    for (std::int64_t i = 0; i < g.numel(); ++i)
      worst_abs = std::max(worst_abs, std::abs(p.grad.data<double>()[i] - g.data<double>()[i]));
    EXPECT_LT(e, 1e-8) << p.name;
    worst_rel = std::max(worst_rel, e);
  }
  EXPECT_LT(worst_abs, 1e-8);
  std::printf("[grpo %s] loss %.6f, |loss - torch| %.2e, gradient max abs %.2e, max rel %.2e, "
              "clipped %g/%g tokens, kl %.3e\n",
              gc.name, loss, loss_err, worst_abs, worst_rel, stats.clipped, stats.tokens,
              stats.kl / stats.tokens);
}

}  // namespace

TEST(Grpo, EqualRewardsGiveZeroAdvantages) {
  GrpoOptions o;
  const std::vector<double> rewards = {1, 1, 1, 1, 0, 1, 0, 0, 0.3, 0.3, 0.3, 0.3};
  for (bool std_norm : {true, false}) {
    o.std_normalize = std_norm;
    const auto a = group_advantages(rewards, 4, o);
    for (std::size_t i : {0u, 1u, 2u, 3u, 8u, 9u, 10u, 11u}) EXPECT_EQ(a[i], 0.0) << i;
    // The mixed group: centred, and unit (sample) std when normalised.
    EXPECT_NEAR(a[4] + a[5] + a[6] + a[7], 0.0, 1e-15);
    EXPECT_GT(a[5], 0.0);
    EXPECT_LT(a[4], 0.0);
    if (std_norm) EXPECT_NEAR(a[5], 0.75 / (0.5 + o.adv_eps), 1e-12);
    else EXPECT_DOUBLE_EQ(a[5], 0.75);
  }
  EXPECT_THROW(group_advantages(rewards, 1, o), Error);
  EXPECT_THROW(group_advantages(rewards, 5, o), Error);
  // Zero advantage and no KL: every token weight is zero.
  const std::vector<std::int32_t> targets = {-1, 2, 3};
  const std::vector<double> logp = {0, -1, -2}, adv = {0, 0, 0};
  std::vector<double> w(3, 7.0);
  EXPECT_EQ(grpo_token_objective(targets, logp, logp, {}, adv, 2.0, o, w), 0.0);
  for (double x : w) EXPECT_EQ(x, 0.0);
}

TEST(Grpo, WeightedLossGradientMatchesFiniteDifferences) {
  ModelConfig c = test::tiny_model_config();
  c.seq_len = 5;
  Llama<double> model(c);
  Rng rng(3);
  model.init_weights(rng);
  const int b = 2, t = 5;
  const auto tokens = test::random_ids(b * t, c.vocab_size, 4);
  auto targets = test::random_ids(b * t, c.vocab_size, 5);
  targets[0] = targets[6] = -1;
  const auto weights = test::random_vector(b * t, 6);  // signed, as advantages are
  model.zero_grad();
  const double loss = model.forward(tokens, targets, b, t, weights);
  model.backward(1.0);
  // The loss is sum_i w_i * (-log p(target_i)) over counted targets.
  std::vector<double> logp(b * t);
  model.target_log_probs(logp);
  double expect = 0;
  for (std::size_t i = 0; i < logp.size(); ++i) expect += targets[i] >= 0 ? -weights[i] * logp[i] : 0;
  EXPECT_NEAR(loss, expect, 1e-12);
  double worst = 0;
  for (auto& p : model.named_params()) {
    std::vector<double> analytic(p.grad.span<double>().begin(), p.grad.span<double>().end());
    const double e = test::fd_rel_error(p.value.span<double>(), analytic,
                                        [&] { return model.forward(tokens, targets, b, t, weights); });
    EXPECT_LT(e, 1e-6) << p.name;
    worst = std::max(worst, e);
  }
  // set_target_weights after a plain forward is the same loss and gradient.
  Tensor g1 = model.grads().clone();
  model.zero_grad();
  model.forward(tokens, targets, b, t);
  EXPECT_NEAR(model.set_target_weights(weights), loss, 1e-12);
  model.backward(1.0);
  EXPECT_EQ(test::rel_max_diff(model.grads(), g1), 0.0);
  std::printf("[grad] weighted token loss fp64, worst relative error: %.2e\n", worst);
}

TEST(Grpo, MatchesPyTorchRatioOne) { check_against_torch({"ratio 1", 0.0, {}}); }
TEST(Grpo, MatchesPyTorchClipped) { check_against_torch({"clipped", 0.3, {0.2, 0.0, 1e-4, true}}); }
TEST(Grpo, MatchesPyTorchWithKl) { check_against_torch({"kl", 0.3, {0.2, 0.1, 1e-4, true}}); }
TEST(Grpo, MatchesPyTorchNoStd) { check_against_torch({"no std", 0.3, {0.2, 0.05, 1e-4, false}}); }
