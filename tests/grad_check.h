#pragma once
// Central finite differences for the fp64 gradient checks of the model tests.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "pion/core/random.h"

namespace pion::test {

// Relative error of an analytic gradient against central differences of f over every entry
// of x (changed and restored in place): max |analytic - numeric| / max |numeric|.
inline double fd_rel_error(std::span<double> x, std::span<const double> analytic,
                           const std::function<double()>& f, double h = 1e-6) {
  double max_err = 0.0, max_ref = 0.0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double saved = x[i];
    x[i] = saved + h;
    const double up = f();
    x[i] = saved - h;
    const double down = f();
    x[i] = saved;
    const double numeric = (up - down) / (2 * h);
    max_err = std::max(max_err, std::abs(numeric - analytic[i]));
    max_ref = std::max(max_ref, std::abs(numeric));
  }
  return max_err / std::max(max_ref, 1e-300);
}

inline std::vector<double> random_vector(std::size_t n, std::uint64_t seed, double std = 1.0) {
  Rng rng(seed);
  std::vector<double> v(n);
  for (auto& x : v) x = std * rng.normal();
  return v;
}

inline double dot(std::span<const double> a, std::span<const double> b) {
  double s = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

}  // namespace pion::test
