#include "pion/model/sampling.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>

#include "pion/core/error.h"

namespace pion {

void SamplingParams::validate() const {
  check(std::isfinite(temperature) && temperature >= 0.0,
        "sampling: temperature must be finite and >= 0 (got " + std::to_string(temperature) + ")");
  check(top_k >= 0, "sampling: top_k must be >= 0 (got " + std::to_string(top_k) + ")");
  check(std::isfinite(top_p) && top_p > 0.0 && top_p <= 1.0,
        "sampling: top_p must be in (0, 1] (got " + std::to_string(top_p) + ")");
}

int sample_token(std::span<const float> logits, const SamplingParams& params, Rng& rng,
                 SamplerScratch& scratch) {
  const int v = static_cast<int>(logits.size());
  check(v > 0, "sample_token: empty logits");
  if (params.temperature <= 0.0)
    return static_cast<int>(std::max_element(logits.begin(), logits.end()) - logits.begin());
  auto& order = scratch.order;
  auto& probs = scratch.probs;
  order.resize(static_cast<std::size_t>(v));
  probs.resize(static_cast<std::size_t>(v));
  std::iota(order.begin(), order.end(), 0);
  const int k = params.top_k > 0 && params.top_k < v ? params.top_k : v;
  std::partial_sort(order.begin(), order.begin() + k, order.end(),
                    [&](int a, int b) { return logits[static_cast<std::size_t>(a)] >
                                               logits[static_cast<std::size_t>(b)]; });
  const double top = logits[static_cast<std::size_t>(order[0])];
  double sum = 0.0;
  for (int i = 0; i < k; ++i) {
    const double z = (logits[static_cast<std::size_t>(order[static_cast<std::size_t>(i)])] - top) /
                     params.temperature;
    probs[static_cast<std::size_t>(i)] = static_cast<float>(std::exp(z));
    sum += probs[static_cast<std::size_t>(i)];
  }
  // Nucleus: candidates are in decreasing probability, so the nucleus is a prefix.
  int kept = k;
  if (params.top_p < 1.0) {
    double mass = 0.0;
    for (int i = 0; i < k; ++i) {
      mass += probs[static_cast<std::size_t>(i)];
      if (mass >= params.top_p * sum) {
        kept = i + 1;
        break;
      }
    }
    sum = mass;
  }
  double u = rng.uniform() * sum;
  for (int i = 0; i < kept; ++i) {
    u -= probs[static_cast<std::size_t>(i)];
    if (u <= 0) return order[static_cast<std::size_t>(i)];
  }
  return order[static_cast<std::size_t>(kept - 1)];  // rounding left u a hair above 0
}

double token_log_prob(std::span<const float> logits, int token) {
  check(token >= 0 && static_cast<std::size_t>(token) < logits.size(),
        "token_log_prob: token " + std::to_string(token) + " outside the logits");
  const double mx = *std::max_element(logits.begin(), logits.end());
  double sum = 0.0;
  for (float l : logits) sum += std::exp(static_cast<double>(l) - mx);
  return static_cast<double>(logits[static_cast<std::size_t>(token)]) - mx - std::log(sum);
}

double softmax_entropy(std::span<const float> logits) {
  check(!logits.empty(), "softmax_entropy: no logits");
  // H = log Z - sum_j p_j (l_j - mx) with Z = sum_j exp(l_j - mx): one pass for both sums.
  const double mx = *std::max_element(logits.begin(), logits.end());
  double z = 0.0, weighted = 0.0;
  for (float l : logits) {
    const double x = static_cast<double>(l) - mx;
    const double e = std::exp(x);
    z += e;
    weighted += e * x;
  }
  return std::log(z) - weighted / z;
}

}  // namespace pion
