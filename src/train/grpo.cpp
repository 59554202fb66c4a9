// The GRPO advantages and per-token objective (pion/train/grpo.h).
#include "pion/train/grpo.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "pion/core/error.h"

namespace pion {

std::vector<double> group_advantages(std::span<const double> rewards, int group_size,
                                     const GrpoOptions& options) {
  check(group_size >= 2, "grpo: the group size must be >= 2 (advantages are relative to the "
                         "group), got " + std::to_string(group_size));
  const auto g = static_cast<std::size_t>(group_size);
  check(rewards.size() % g == 0, "grpo: " + std::to_string(rewards.size()) +
                                     " rewards do not form groups of " + std::to_string(g));
  std::vector<double> out(rewards.size(), 0.0);
  for (std::size_t start = 0; start < rewards.size(); start += g) {
    const auto group = rewards.subspan(start, g);
    double mean = 0.0;
    for (double r : group) mean += r;
    mean /= static_cast<double>(g);
    // All equal: exactly zero (r - mean could be a rounding residue for non-binary rewards).
    if (std::all_of(group.begin(), group.end(), [&](double r) { return r == group[0]; }))
      continue;
    double var = 0.0;
    for (double r : group) var += (r - mean) * (r - mean);
    const double std = std::sqrt(var / static_cast<double>(g - 1));
    const double scale = options.std_normalize ? 1.0 / (std + options.adv_eps) : 1.0;
    for (std::size_t i = 0; i < g; ++i) out[start + i] = (group[i] - mean) * scale;
  }
  return out;
}

double grpo_token_objective(std::span<const std::int32_t> targets, std::span<const double> logp,
                            std::span<const double> logp_old, std::span<const double> ref_logp,
                            std::span<const double> advantage, double normalizer,
                            const GrpoOptions& options, std::span<double> weights,
                            GrpoTokenStats* stats) {
  const std::size_t n = targets.size();
  const bool kl = options.kl_coef > 0.0, have_ref = !ref_logp.empty();
  check(logp.size() == n && logp_old.size() == n && advantage.size() == n &&
            weights.size() == n && (have_ref || !kl) && (!have_ref || ref_logp.size() == n),
        "grpo: per-position inputs must all have " + std::to_string(n) + " entries");
  check(normalizer > 0.0, "grpo: the token normalizer must be positive");
  const double lo = 1.0 - options.clip_eps, hi = 1.0 + options.clip_eps;
  double loss = 0.0;
  GrpoTokenStats local;
  for (std::size_t i = 0; i < n; ++i) {
    weights[i] = 0.0;
    if (targets[i] < 0) continue;
    const double a = advantage[i];
    const double ratio = std::exp(logp[i] - logp_old[i]);
    const double clipped_ratio = std::clamp(ratio, lo, hi);
    const double unclipped = ratio * a, clipped = clipped_ratio * a;
    // The min takes the clipped branch only where it is strictly smaller: there the ratio is
    // outside [lo, hi] on the side the advantage pushes towards, and the gradient is 0.
    const bool clip_binds = clipped < unclipped;
    double value = -std::min(unclipped, clipped);
    double dlogp = clip_binds ? 0.0 : -a * ratio;
    if (have_ref) {
      const double k3 = k3_kl(logp[i], ref_logp[i]);
      local.kl += k3;
      if (kl) {
        value += options.kl_coef * k3;
        dlogp += options.kl_coef * (1.0 - std::exp(ref_logp[i] - logp[i]));
      }
    }
    loss += value;
    weights[i] = -dlogp / normalizer;
    local.tokens += 1.0;
    local.clipped += clip_binds ? 1.0 : 0.0;
    local.ratio += ratio;
  }
  if (stats != nullptr) {
    stats->tokens += local.tokens;
    stats->kl += local.kl;
    stats->clipped += local.clipped;
    stats->ratio += local.ratio;
  }
  return loss / normalizer;
}

}  // namespace pion
