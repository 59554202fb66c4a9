#pragma once
// A small, fast, reproducible RNG (xoshiro256** seeded by splitmix64). Its whole state is four
// 64-bit words, so a checkpoint can store it and a resumed run draws the same numbers.
#include <array>
#include <cstdint>

#include "pion/core/tensor.h"

namespace pion {

class Rng {
 public:
  explicit Rng(std::uint64_t seed = 0);
  std::uint64_t next_u64();
  double uniform();  // [0, 1)
  double normal();   // standard normal (Box-Muller; no cached second value, so state is 4 words)
  std::uint64_t below(std::uint64_t n);  // uniform integer in [0, n)
  std::array<std::uint64_t, 4> state() const { return s_; }
  void set_state(const std::array<std::uint64_t, 4>& s) { s_ = s; }

 private:
  std::array<std::uint64_t, 4> s_{};
};

// Fills a float or double tensor with N(mean, std^2) / U[lo, hi) draws.
void fill_normal(Tensor& t, Rng& rng, double mean = 0.0, double std = 1.0);
void fill_uniform(Tensor& t, Rng& rng, double lo, double hi);

}  // namespace pion
