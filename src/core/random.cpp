#include "pion/core/random.h"

#include <cmath>
#include <numbers>

#include "pion/core/error.h"

namespace pion {

namespace {
std::uint64_t splitmix64(std::uint64_t& x) {
  std::uint64_t z = (x += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}
std::uint64_t rotl(std::uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
}  // namespace

Rng::Rng(std::uint64_t seed) {
  for (auto& w : s_) w = splitmix64(seed);
}

std::uint64_t Rng::next_u64() {
  const std::uint64_t result = rotl(s_[1] * 5, 7) * 9;
  const std::uint64_t t = s_[1] << 17;
  s_[2] ^= s_[0];
  s_[3] ^= s_[1];
  s_[1] ^= s_[2];
  s_[0] ^= s_[3];
  s_[2] ^= t;
  s_[3] = rotl(s_[3], 45);
  return result;
}

double Rng::uniform() { return static_cast<double>(next_u64() >> 11) * 0x1.0p-53; }

double Rng::normal() {
  double u1 = uniform();
  while (u1 <= 0.0) u1 = uniform();
  const double u2 = uniform();
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * std::numbers::pi * u2);
}

std::uint64_t Rng::below(std::uint64_t n) {
  check(n > 0, "Rng::below(0)");
  return next_u64() % n;  // bias is < n / 2^64: negligible for data sampling
}

void fill_normal(Tensor& t, Rng& rng, double mean, double std) {
  if (t.dtype() == DType::F32) {
    for (auto& x : t.span<float>()) x = static_cast<float>(mean + std * rng.normal());
  } else {
    for (auto& x : t.span<double>()) x = mean + std * rng.normal();
  }
}

void fill_uniform(Tensor& t, Rng& rng, double lo, double hi) {
  if (t.dtype() == DType::F32) {
    for (auto& x : t.span<float>()) x = static_cast<float>(lo + (hi - lo) * rng.uniform());
  } else {
    for (auto& x : t.span<double>()) x = lo + (hi - lo) * rng.uniform();
  }
}

}  // namespace pion
