#pragma once
// The GRPO objective (group-relative policy optimisation) as pure functions, so the loss and
// its gradient are checked against an independent PyTorch implementation
// (tests/test_rl.cpp, tests/reference/grpo_torch.py).
//
// For G completions of one prompt with rewards r_1..r_G, each completion's advantage is
//   A_i = (r_i - mean(r)) / (std(r) + adv_eps)     (std: the sample std, n - 1, as torch.std)
// or, with std_normalize off (Dr. GRPO), A_i = r_i - mean(r). A group whose rewards are all
// equal has A = 0 exactly: it gives no signal.
//
// Per completion token t (logp_t under the current policy, logp_old_t under the policy that
// sampled it, ref_t under the frozen initial policy, ratio r_t = exp(logp_t - logp_old_t)):
//   loss_t = -min(r_t A, clip(r_t, 1 - clip_eps, 1 + clip_eps) A)
//            + kl_coef * (exp(ref_t - logp_t) - (ref_t - logp_t) - 1)          (k3 estimate)
// and the batch loss is sum_t loss_t / N, N = every completion token of the (global) batch.
// Its gradient is a weight per token on grad log p(token):
//   d loss_t / d logp_t = -A r_t   where the unclipped branch is the min (0 where the clip binds)
//                        + kl_coef * (1 - exp(ref_t - logp_t))
// so the model's weighted cross-entropy (Llama::forward's target_weights: the loss
// sum_t w_t * (-logp_t)) with w_t = -(d loss_t / d logp_t) / N has the objective's gradient.
#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

namespace pion {

struct GrpoOptions {
  double clip_eps = 0.2;
  double kl_coef = 0.0;
  double adv_eps = 1e-4;
  bool std_normalize = true;
};

// rewards: consecutive groups of group_size (>= 2) completions; one advantage per reward.
std::vector<double> group_advantages(std::span<const double> rewards, int group_size,
                                     const GrpoOptions& options);

// What one batch's tokens measured (sums, so micro-batches add up).
// The k3 estimate of KL(policy || reference) at one token, exp(d) - d - 1 with
// d = ref_logp - logp (Schulman's unbiased, non-negative estimator).
inline double k3_kl(double logp, double ref_logp) {
  const double d = ref_logp - logp;
  return std::exp(d) - d - 1.0;
}

struct GrpoTokenStats {
  double tokens = 0.0;    // completion tokens seen
  double kl = 0.0;        // sum of the k3 estimates (when ref_logp was given)
  double clipped = 0.0;   // tokens whose clip binds
  double ratio = 0.0;     // sum of the ratios
};

// Per position i of a micro-batch (targets[i] < 0: not a completion token, weight 0): reads
// logp, logp_old, ref_logp (may be empty when kl_coef == 0; when given, the KL statistic is
// measured whatever kl_coef) and advantage, writes
// weights[i] = -(d loss_i / d logp_i) / normalizer and returns sum_i loss_i / normalizer.
// Adds to `stats` when given.
double grpo_token_objective(std::span<const std::int32_t> targets, std::span<const double> logp,
                            std::span<const double> logp_old, std::span<const double> ref_logp,
                            std::span<const double> advantage, double normalizer,
                            const GrpoOptions& options, std::span<double> weights,
                            GrpoTokenStats* stats = nullptr);

}  // namespace pion
