#pragma once
// How the Pion optimizer tests (test_pion.cpp, test_pion_variants.cpp) drive an optimizer:
// random weight matrices with their gradients, steps on fresh random gradients, and the
// 1000-step run whose spectrum drift they check.
#include <gtest/gtest.h>

#include <cstdint>
#include <string>

#include "compare.h"
#include "helpers.h"
#include "pion/core/random.h"
#include "pion/optim/optimizer.h"
#include "pion/optim/pion.h"

namespace pion::test {

// One weight matrix and its gradient buffer.
struct Matrix {
  Tensor w, g;
  Param param(const std::string& name) { return Param{name, w, g}; }
};

// An m x n weight and gradient, both N(0, 1) (seeds `seed` and seed + 1000).
inline Matrix random_matrix(std::int64_t m, std::int64_t n, std::uint64_t seed) {
  return {random_tensor({m, n}, seed), random_tensor({m, n}, seed + 1000)};
}

// Runs `steps` optimizer steps, refilling every gradient with N(0, 1) draws from `rng`.
inline void random_steps(Optimizer& opt, int steps, Rng& rng) {
  for (int t = 0; t < steps; ++t) {
    for (auto& group : opt.groups())
      for (auto& p : group.params) fill_normal(p.grad, rng);
    ASSERT_TRUE(opt.step());
  }
}

// 1000 steps of Pion (lr 0.05, `options`) on random_matrix(m, n, seed) with gradients from
// Rng(seed + 1): the spectrum drift, which an exact retraction keeps below 1e-5, and how far the
// weights moved (||W - W0||_F / ||W0||_F), which shows the check is not vacuous.
struct SpectrumRun {
  double drift, moved;
};
inline SpectrumRun spectrum_run(const Pion::Options& options, std::int64_t m, std::int64_t n,
                                std::uint64_t seed) {
  Matrix x = random_matrix(m, n, seed);
  const Tensor w0 = x.w.clone();
  Pion opt;
  opt.add_param_group({x.param("w")}, 0.05, options);
  Rng rng(seed + 1);
  random_steps(opt, 1000, rng);
  return {opt.spectrum_drift("w"), rel_frobenius_diff(x.w, w0)};
}

}  // namespace pion::test
